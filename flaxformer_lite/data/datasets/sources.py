"""Open a TFDS dataset as a random-access source, preparing our own builders on first use."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from flaxformer_lite import files
from flaxformer_lite.data.pipeline import text_of

OUR_BUILDERS = (
    "bible_translate", "bible_lm", "tsv_translate", "text_lm",
    "bible_paraphrase", "bible_version", "tsv_classify",  # classification (issue 30)
    "bible_long",  # long documents (issue 39)
)  # fmt: skip
LONG_TEXT_BYTES = 4000  # a tokenizer-training text past this is given line by line (training_texts)


def default_data_dir(workdir: str) -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(workdir, "tfds")


def prepared_dir(
    data_dir: str, manual_dir: str | None = None, db_path: str | None = None, fields: str | None = None
) -> str:
    """Where a dataset built from local files is prepared: a folder named by what it is built from.

    A builder reading `manual_dir` (your corpus) or `db_path` is prepared under
    `<data_dir>/source-<hash>`, the hash of every source file's path, size and modification time,
    so a changed or different corpus is prepared afresh instead of silently reusing the old one.
    `source.json` there lists the files (and the `fields` read from columnar ones). Other datasets
    use `data_dir` itself.
    """
    files = []
    if manual_dir:
        folder = os.path.abspath(os.path.expanduser(manual_dir))
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"manual_dir {manual_dir!r} is not a folder; point it at your corpus files."
            )
        files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if not f.startswith(".")]
        files += [  # HF save_to_disk folders: their Arrow files
            os.path.join(f, g) for f in files if os.path.isdir(f) for g in sorted(os.listdir(f))
        ]
    if db_path:
        files.append(os.path.abspath(os.path.expanduser(db_path)))
    if not files:
        return data_dir
    stats = {f: os.stat(f) for f in files if os.path.isfile(f)}
    described = [{"path": f, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns} for f, st in stats.items()]
    if fields:  # other columns of the same files are another dataset
        described.append({"fields": fields})
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
    out = os.path.join(data_dir, f"source-{digest}")
    listing = os.path.join(out, "source.json")
    if not os.path.isfile(listing):  # the folder is named by the hash of this listing: written once
        os.makedirs(out, exist_ok=True)
        tmp = f"{listing}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(described, f, indent=1)
        os.replace(tmp, listing)
    return out


def open_source(name: str, split: str, data_dir: str, *, manual_dir: str | None = None, **builder_kwargs):
    """Random-access TFDS source for `name` ("dataset/config") and `split`, built if it is ours.

    Our builders are prepared into `data_dir` on first use (array_record, no TensorFlow). Any other
    TFDS dataset must already be prepared there; otherwise the error says how. `split` may be a TFDS
    slice ("train[:1000]", "train[10%:20%]"), e.g. for fewer labelled examples: a fixed random subset
    where the split is stored shuffled by key hash (ours under writer.BUFFER_BYTES), else those lines.
    """
    builder = _builder(name, data_dir, **builder_kwargs)
    if not builder.is_prepared():
        if name.split("/")[0] not in OUR_BUILDERS:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {data_dir!r}. Prepare it once with "
                f"`tfds build {name} --data_dir={data_dir} --file_format=array_record` (machines "
                "without internet need its files placed by hand; see the TFDS docs for the dataset)."
            )
        config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
        logging.info("preparing %s in %s", name, data_dir)
        builder.download_and_prepare(file_format="array_record", download_config=config)
    if split.split("[")[0] not in builder.info.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}.")
    try:
        info = builder.info.splits[split]
    except (ValueError, AssertionError, KeyError) as e:  # a malformed slice
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"bad split {split!r} of {name!r} ({why}); slices read like 'train[:1000]'.") from e
    if info.num_examples == 0:
        raise ValueError(f"split {split!r} of {name!r} is empty; pick another split.")
    files_read = info.file_instructions  # the split's files, in the order its records are numbered
    paths, counts = [str(f.filename) for f in files_read], [f.take for f in files_read]
    fix = _reprepare(name, data_dir, builder.data_dir)
    skips = [(f.skip, f.examples_in_shard) for f in files_read]
    return CheckedSource(builder.as_data_source(split=split), paths, counts, fix, skips)


def _reprepare(name: str, data_dir: str, folder: str) -> str:
    """How to replace a damaged prepared dataset in `folder` (inside `data_dir`)."""
    if name.split("/")[0] in OUR_BUILDERS:
        return f"the prepared dataset is damaged: delete {folder} and rerun, which prepares it again"
    return (
        f"the prepared dataset is damaged: delete {folder} and prepare it again with "
        f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`"
    )


class CheckedSource:
    """A split's random-access source whose read errors name the damaged file and how to re-prepare it.

    Opening one reads the first record of every file, so a truncated file (its index is at the end)
    fails here, before any training; a garbled record deeper in fails when it is read.
    """

    def __init__(self, source, paths: list[str], counts: list[int], fix: str, skips=None):
        self.source, self.paths, self.fix = source, paths, fix
        self.ends = list(itertools.accumulate(counts))  # one past each file's last record
        # A slice reads records [skip, skip + count) of each file: (skip, records in the file) per file
        skips = skips or [(0, c) for c in counts]
        shard_starts = [0, *itertools.accumulate(n for _, n in skips)][:-1]
        self._raw_offsets = [start + skip for start, (skip, _) in zip(shard_starts, skips, strict=True)]
        self._starts = [0, *self.ends[:-1]]  # each file's first record in this split's numbering
        self._whole = self._raw_offsets == self._starts  # not a slice: record numbers are raw indices
        for start, count in zip([0, *self.ends[:-1]], counts, strict=True):
            if count:
                self[start]

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, key):
        try:
            return self.source[key]
        except IndexError:
            raise
        except Exception as e:  # noqa: BLE001  (Riegeli, array_record and protobuf errors alike)
            raise self._unreadable([key], e) from e

    def __getitems__(self, keys):
        try:
            return self.source.__getitems__(keys)
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(keys, e) from e

    def texts(self, start: int, stop: int, features: list[str]) -> list[tuple[str, ...]]:
        """The text features of records [start, stop) as str tuples, read raw (~25 us a record, against
        ~100 us through TFDS's feature decoding): each record is a tf.train.Example whose Text
        features are one bytes value each."""
        from array_record.python.array_record_data_source import ArrayRecordDataSource
        from tensorflow_datasets.proto import tf_example_pb2

        if not hasattr(self, "_raw"):
            self._raw = ArrayRecordDataSource(self.paths)
        keys = list(range(start, stop))
        try:
            records = self._raw.__getitems__([self._raw_index(k) for k in keys])
            parsed = [tf_example_pb2.Example.FromString(r).features.feature for r in records]
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(keys, e) from e
        try:
            return [tuple(p[f].bytes_list.value[0].decode("utf-8") for f in features) for p in parsed]
        except IndexError:  # not one text per feature (another feature type): TFDS's decoding
            examples = self.__getitems__(keys)
            return [tuple(text_of(e[f]) for f in features) for e in examples]

    def _raw_index(self, key: int) -> int:
        """Record `key` of this (possibly sliced) split as an index into its whole files."""
        if self._whole:
            return key
        shard = bisect.bisect_right(self.ends, key)
        return self._raw_offsets[shard] + key - self._starts[shard]

    def _unreadable(self, keys, e: Exception) -> files.UnreadableFileError:
        shards = sorted({bisect.bisect_right(self.ends, int(k)) for k in keys})
        named = [self.paths[i] for i in shards if i < len(self.paths)] or self.paths
        return files.unreadable(" or ".join(named), e, self.fix)

    def __repr__(self) -> str:
        return f"CheckedSource({self.source!r})"


def supervised_keys(name: str, data_dir: str, reverse: bool = False, **builder_kwargs) -> tuple[str, str]:
    """(source feature, target feature) of a translation dataset, swapped if `reverse`."""
    keys = _builder(name, data_dir, **builder_kwargs).info.supervised_keys
    if not keys or len(keys) != 2:
        raise ValueError(
            f"dataset {name!r} declares no (source, target) supervised keys; it is not a translation set."
        )
    return (keys[1], keys[0]) if reverse else tuple(keys)


def _builder(name: str, data_dir: str, manual_dir: str | None = None, **builder_kwargs):
    del manual_dir  # read only when preparing (open_source); not a builder argument
    folder = os.path.join(data_dir, name)
    try:
        return tfds.builder(name, data_dir=data_dir, file_format="array_record", **builder_kwargs)
    except tfds.core.registered.DatasetNotFoundError as e:
        # Without TensorFlow, TFDS reads catalog datasets from their prepared files only.
        raise FileNotFoundError(
            f"dataset {name!r} is not one of ours {OUR_BUILDERS} and is not prepared in {data_dir!r}. "
            f"For a TFDS catalog dataset run `tfds build {name} --data_dir={data_dir} "
            "--file_format=array_record` once (on a machine with its sources), then pass that data_dir; "
            "otherwise check the name."
        ) from e
    except Exception as e:
        if not os.path.isdir(folder):  # not about prepared files (a config name that does not exist)
            raise
        # Its dataset_info.json is damaged (tfds counts a dataset as prepared once that file exists).
        raise files.unreadable(folder, e, _reprepare(name, data_dir, folder)) from e


def training_texts(
    source, features: list[str], max_examples: int = 500_000, chunk: int = 8192, seed: int = 0
):
    """Distinct texts of the given features for tokenizer training (pass the *train* split only).

    A split of more than `max_examples` examples is sampled (a seeded uniform sample, read in index
    order), so the tokenizer's time and memory do not grow with the corpus; smaller splits are read
    whole. Each text once: a corpus of aligned versions (every source version paired with every
    target version) repeats each sentence once per pairing, which would only slow SentencePiece down.
    A text longer than `LONG_TEXT_BYTES` (a long document: SentencePiece skips sentences past its
    max_sentence_length of 4096 bytes) is given line by line. Read `chunk` examples at a time
    (`__getitems__`: several times faster than one by one).
    """
    n = len(source)
    if n > max_examples:
        indices = np.sort(np.random.default_rng(seed).choice(n, max_examples, replace=False)).tolist()
        logging.info("tokenizer training: a sample of %d of the %d train examples", max_examples, n)
    else:
        indices = list(range(n))
    seen = set()
    for start in range(0, len(indices), chunk):
        part = indices[start : start + chunk]
        examples = (
            source.__getitems__(part) if hasattr(source, "__getitems__") else map(source.__getitem__, part)
        )
        for example in examples:
            for feature in features:
                value = example[feature]
                text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
                long = len(text) > LONG_TEXT_BYTES // 4 and len(text.encode()) > LONG_TEXT_BYTES
                for part in text.splitlines() if long else [text]:
                    if part not in seen:
                        seen.add(part)
                        yield part
