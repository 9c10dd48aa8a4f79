"""Prepare a TFDS dataset of any size without TensorFlow: array_record shards written as examples stream.

TFDS's own generator writer keeps every example of a split in a `Shuffler` and, once that holds
1 GB, spills it to disk through `tf.io.gfile`, i.e. TensorFlow, which this project does not install;
so a corpus past ~1 GB of examples could not be prepared. `StreamingBuilder` replaces only the
writing step of `GeneratorBasedBuilder` (the builder's `_info`, `_split_generators` and
`_generate_examples` are unchanged, and the result is read with `tfds.data_source` as before):

- A split whose serialized examples fit in `BUFFER_BYTES` is ordered exactly as TFDS orders it
  (sorted by the hash of each key, salted with the split name), so small datasets are prepared
  record for record as before.
- A larger split is written in the order its generator yields, without holding it: the buffer is
  flushed and every later example goes straight to the current shard. Memory stays bounded by the
  buffer plus one example (training shuffles globally anyway; see `input_pipeline`).

Shards hold at most `SHARD_BYTES` each and are written under temporary names, renamed to TFDS's
`<name>-<split>.array_record-0000i-of-0000n` once the split is complete, inside the temporary folder
TFDS renames into place when every split is done: an interrupted preparation leaves nothing that
reads as prepared.
"""

from __future__ import annotations

import os
import time

import tensorflow_datasets as tfds
import tqdm
from absl import logging
from tensorflow_datasets.core import example_serializer, hashing

from flaxformer_lite import files

BUFFER_BYTES = 256 << 20  # a split whose examples fit is shuffled by key hash like TFDS's writer
SHARD_BYTES = 512 << 20  # bytes of serialized examples per array_record shard


class StreamingBuilder(tfds.core.GeneratorBasedBuilder):
    """A `GeneratorBasedBuilder` whose splits are written as they stream (see the module docstring)."""

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        del download_config
        generators = self._split_generators(dl_manager)
        infos = [self._write_split(name, examples) for name, examples in generators.items()]
        self.info.set_splits(tfds.core.SplitDict(infos))

    def _stream(self, split: str, examples, shards: _ShardWriter, bar) -> None:
        """Serialize and write every example; ordered by hashed key while they fit in the buffer."""
        features = self.info.features
        serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
        buffer, buffered, hasher = [], 0, hashing.Hasher(split)
        for key, example in examples:
            data = serializer.serialize_example(features.encode_example(example))
            bar.update(1)
            if buffer is None:
                shards.write(data)
                continue
            buffer.append((hasher.hash_key(key), data))
            buffered += len(data)
            if buffered > BUFFER_BYTES:  # too large to order in memory: stream in generation order
                logging.info(
                    "%s %s: over %d MB of examples, written in the order they are read (not shuffled "
                    "by key); training shuffles them", self.name, split, BUFFER_BYTES >> 20,
                )  # fmt: skip
                for _, buffered_data in buffer:
                    shards.write(buffered_data)
                buffer = None
        if buffer:
            _check_unique_keys(buffer, self.name, split)
            for _, data in sorted(buffer):
                shards.write(data)

    def _write_split(self, split: str, examples) -> tfds.core.SplitInfo:
        template = self._get_filename_template(split)
        shards = _ShardWriter(template, split)
        start = time.time()
        with tqdm.tqdm(
            desc=f"preparing {self.name} {split}",
            unit=" examples",
            mininterval=2.0,
            leave=False,
            disable=None,
        ) as bar:
            self._stream(split, examples, shards, bar)
        info = shards.finish()
        seconds = time.time() - start
        logging.info(
            "prepared %s %s: %d examples, %.1f MB in %d shard(s), %.0f s (%.0f examples/s)",
            self.name, split, info.num_examples, info.num_bytes / 1e6, len(info.shard_lengths), seconds,
            info.num_examples / max(seconds, 1e-9),
        )  # fmt: skip
        return info


def _check_unique_keys(buffer: list, name: str, split: str) -> None:
    keys = [k for k, _ in buffer]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name} {split}: two examples have the same key; keys must be unique.")


class _ShardWriter:
    """array_record shards of at most SHARD_BYTES, under temporary names until `finish`."""

    def __init__(self, template, split: str):
        self.template, self.split = template, split
        self.lengths, self.paths, self.bytes = [], [], 0
        self._writer, self._shard_bytes = None, 0

    def write(self, data: bytes) -> None:
        if self._writer is None or self._shard_bytes >= SHARD_BYTES:
            self._open()
        try:
            self._writer.write(data)
        except Exception as e:  # noqa: BLE001  (array_record reports a full disk as it can)
            raise OSError(
                f"writing {self.paths[-1]} failed ({files.reason(e)}); nothing was prepared: free space "
                "and rerun (preparation starts again)"
            ) from e
        self.lengths[-1] += 1
        self._shard_bytes += len(data)
        self.bytes += len(data)

    def _open(self) -> None:
        self._close()
        from array_record.python import array_record_module

        path = os.fspath(self.template.data_dir / f"{self.split}.shard{len(self.paths)}.incomplete")
        self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")  # as TFDS writes
        self.paths.append(path)
        self.lengths.append(0)
        self._shard_bytes = 0

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> tfds.core.SplitInfo:
        self._close()
        if not self.paths:
            raise ValueError(f"split {self.split!r} has no examples.")
        for i, path in enumerate(self.paths):
            os.replace(path, self.template.sharded_filepath(shard_index=i, num_shards=len(self.paths)))
        return tfds.core.SplitInfo(
            name=self.split, shard_lengths=self.lengths, num_bytes=self.bytes, filename_template=self.template
        )
