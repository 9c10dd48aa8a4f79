"""From a random-access data source to per-host batches with grain: tokenize, trim, pack or pad, batch.

Batches are dicts of int32 numpy arrays [batch, max_length]: `inputs`/`targets` (translation) or
`targets` (language modelling), each with `*_segment_ids` (0 = padding) and `*_positions`, the
format the models consume. The iterator's position is `iterator.get_state()` (a small dict saved
in checkpoints); `set_state` on a fresh iterator resumes with exactly the next batch.
"""

from __future__ import annotations

import collections
import dataclasses

import grain
import numpy as np

from flaxformer_lite.data import packing
from flaxformer_lite.ids import EOS_ID


def text_of(value) -> str:
    """A text feature as str (TFDS gives bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class TokenizeStats:
    """What tokenization did to the data (this process, since the iterator was made)."""

    examples: int = 0
    trimmed: int = 0
    empty: int = 0
    byte_fallback_tokens: int = 0

    def report(self) -> str:
        return (
            f"{self.examples} examples, {self.trimmed} sentences trimmed to max_length, "
            f"{self.empty} empty skipped, {self.byte_fallback_tokens} byte-fallback tokens"
        )


class Tokenize:
    """Text features -> int32 ids ending in EOS, trimmed to `max_length` (EOS kept, counted)."""

    def __init__(self, sp, keys: dict[str, str], max_length: int, stats: TokenizeStats | None = None):
        self.sp, self.keys, self.max_length = sp, keys, max_length  # keys: output name -> feature
        self.stats = stats if stats is not None else TokenizeStats()
        self._byte_ids = np.array([sp.is_byte(i) for i in range(sp.get_piece_size())])

    def __call__(self, example: dict) -> dict:
        self.stats.examples += 1
        out = {}
        for name, feature in self.keys.items():
            # A tokenizer with a separate target side (Marian's target.spm) has encode_targets.
            ids = getattr(self.sp, f"encode_{name}", self.sp.encode)(text_of(example[feature]))
            self.stats.byte_fallback_tokens += int(self._byte_ids[ids].sum()) if ids else 0
            if len(ids) >= self.max_length:
                self.stats.trimmed += 1
                ids = ids[: self.max_length - 1]
            out[name] = np.asarray(ids + [EOS_ID], np.int32)
        return out

    def keep(self, example: dict) -> bool:
        """False for an example whose text was empty (only EOS): skipped and counted."""
        empty = any(len(v) <= 1 for v in example.values())
        self.stats.empty += int(empty)
        return not empty


class NoUsableExample(ValueError):
    """A whole pass over a split gave no example that survives tokenization and filtering."""


class FromCache:
    """Token ids from a `token_cache.TokenSource` -> the same arrays `Tokenize` makes from text.

    The split's statistics (trimmed, empty, byte-fallback tokens) are counted once, over the whole
    cache, when this is made: workers cannot report counts back to the main process.
    """

    def __init__(self, cache, max_length: int, stats: TokenizeStats | None = None, split: str = "given"):
        self.keys, self.max_length = {name: name for name in cache.names}, max_length
        self.stats = stats if stats is not None else TokenizeStats()
        lengths = {name: cache.lengths(name) for name in cache.names}
        self.stats.examples += len(cache)
        ends = getattr(cache, "ends", None)  # token_cache.Pieces: EOS only after a text's last piece
        eos = 1 if ends is None else ends.astype(np.int64)
        self.stats.trimmed += int(sum((n + eos > max_length).sum() for n in lengths.values()))
        self.stats.empty += int(np.logical_or.reduce([n == 0 for n in lengths.values()]).sum())
        self.stats.byte_fallback_tokens += cache.meta["byte_fallback_tokens"]
        if self.stats.empty == len(cache):
            raise NoUsableExample(
                f"the {split} split has {len(cache)} prepared examples, and none survives tokenization "
                f"({self.stats.report()}). Check the corpus file of that split."
            )

    def __call__(self, example: dict) -> dict:
        eos = np.full(1, EOS_ID, np.int32)
        return {name: np.concatenate([ids[: self.max_length - 1], eos]) for name, ids in example.items()}

    @staticmethod
    def keep(example: dict) -> bool:
        return all(len(v) > 1 for v in example.values())


class _KeepOrFail:
    """`keep`, failing once more examples in a row were dropped than the split holds: a whole pass
    yields nothing to train on (an endless dataset would otherwise filter forever)."""

    def __init__(self, keep, tokenize: Tokenize, split_size: int, split: str):
        self.keep, self.tokenize, self.limit, self.split = keep, tokenize, split_size, split
        self.dropped_in_a_row = 0

    def __call__(self, example: dict) -> bool:
        if self.keep(example):
            self.dropped_in_a_row = 0
            return True
        self.dropped_in_a_row += 1
        if self.dropped_in_a_row >= self.limit:
            raise NoUsableExample(
                f"the {self.split} split has {self.limit} prepared examples, and none survives tokenization "
                f"and filtering: all {self.dropped_in_a_row} of a pass were empty after tokenization "
                f"({self.tokenize.stats.report()}). Check the corpus file of that split (lines that are "
                "not UTF-8, have the wrong column count or are too long are skipped when it is prepared; "
                "see the preparation log)."
            )
        return False


def _pad(example: dict, max_length: int) -> dict:
    """One unpacked example -> fixed length with segment id 1 on real tokens and positions."""
    out = {}
    for name, ids in example.items():
        n = len(ids)
        out[name] = np.pad(ids, (0, max_length - n))
        out[f"{name}_segment_ids"] = (np.arange(max_length) < n).astype(np.int32)
        out[f"{name}_positions"] = np.where(np.arange(max_length) < n, np.arange(max_length), 0).astype(
            np.int32
        )
    return out


def make_dataset(
    source,
    tokenize: Tokenize,
    *,
    batch_size: int,
    max_length: int,
    pack: bool = True,
    max_segments: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
    split: str = "given",
    workers: int = 0,
) -> grain.IterDataset:
    """Per-host batches of `batch_size` rows; this host reads only its rows of each global batch.

    The record stream is one seeded global permutation per epoch (the same on every host). Of
    each block of `shard_count * batch_size` records, host i reads the i-th `batch_size`. So with
    padded batches the hosts' batches stacked in host order are exactly the single-host batch,
    row for row, whatever the host count (packing happens per host, so packed rows depend on it).
    `num_epochs=None` repeats forever (training). Packed rows hold at most `max_segments`
    sequences (None: no cap), numbered 1.. in order, each contiguous: the layout the fused
    attention kernels read (`ops.segment_layout`). `tokenize` is a `Tokenize` (text records) or a
    `FromCache` (a token cache). `workers` > 0 makes batches in that many processes (grain's
    `mp_prefetch`, after batching so only whole batches cross processes); the batches then depend
    on the worker count, so a run resumes with the same one.
    """
    if len(source) < shard_count:
        raise ValueError(f"the split has {len(source)} examples, fewer than the {shard_count} data shards.")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)  # before repeat: reshuffled (differently seeded) each epoch
    ds = _host_rows(ds.repeat(num_epochs), batch_size, shard_index, shard_count)
    keep = tokenize.keep if num_epochs else _KeepOrFail(tokenize.keep, tokenize, len(source), split)
    ds = ds.map(tokenize).filter(keep)  # endless: a split with nothing to keep fails, never spins
    # No reader threads: records come from local files or memory, and threads only contend for the
    # GIL (grain's default of 16 threads is ~3x slower than none on 2 cores).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if pack:
        it = grain.experimental.FirstFitPackIterDataset(
            it,
            length_struct={name: max_length for name in tokenize.keys},
            num_packing_bins=batch_size,
            shuffle_bins=False,
            max_sequences_per_bin=max_segments,
        )
    else:
        it = it.map(lambda ex: _pad(ex, max_length))
    it = it.batch(batch_size, drop_remainder=drop_remainder)
    if workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


def make_packed_dataset(
    cache,
    *,
    batch_size: int,
    max_length: int,
    max_segments: int | None,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    workers: int = 0,
) -> grain.IterDataset:
    """Endless shuffled packed batches from a token cache (`packing.PackedBatches`): the batches
    `make_dataset(..., pack=True)` would make from the same example order, without grain's per-example
    packing cost. `workers` as in `make_dataset`."""
    order = packing.EpochOrder(
        len(cache), seed=seed, shuffle=True, rows=batch_size, shard_index=shard_index, shard_count=shard_count
    )
    ds = packing.PackedBatches(
        cache, order, batch_size=batch_size, max_length=max_length, max_segments=max_segments
    )
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)) if workers else ds


def _host_rows(ds: grain.MapDataset, rows: int, index: int, count: int) -> grain.MapDataset:
    """Records [index * rows, (index + 1) * rows) of every block of count * rows records of `ds`."""
    if count == 1:
        return ds
    block = count * rows
    full, rest = divmod(len(ds), block)  # len is sys.maxsize for an endless dataset
    size = full * rows + min(max(rest - index * rows, 0), rows)
    return grain.MapDataset.range(size).map(lambda j: ds[(j // rows) * block + index * rows + j % rows])


def token_counts(source, tokenize: Tokenize) -> dict[str, int]:
    """Total tokens (EOS included) per output feature of a whole split, for reports."""
    totals = collections.Counter()
    for i in range(len(source)):
        for name, ids in tokenize(source[i]).items():
            totals[name] += len(ids)
    return dict(totals)
