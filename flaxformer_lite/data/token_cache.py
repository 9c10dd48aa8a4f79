"""Token ids prepared once per (split, tokenizer), so training reads ids instead of tokenizing text.

A cache is a folder `<workdir>/tokens/<name>` holding, for every feature the task reads,
`<feature>.ids` (the SentencePiece ids of every example, without EOS, concatenated in record order;
uint16 when the vocabulary fits, else int32) and `<feature>.offsets` (int64, one more than the
examples: example i is ids[offsets[i]:offsets[i + 1]]), plus `meta.json` (counts, dtypes, and
what it was built from). The name holds a digest of the tokenizer model's bytes and of the prepared
split's files and record counts, so another tokenizer or a re-prepared corpus gets a new cache and
never reads a stale one. It is written under a temporary name and renamed when complete; a cache
whose files do not match its meta.json (a truncated copy) is rebuilt, with a warning (it holds
nothing that cannot be made again).

Reading an example is two memmap slices (about a microsecond), against ~30 us of SentencePiece and
~36 us of TFDS feature decoding per example; building streams the split in chunks with
SentencePiece's batch encoder (memory: the offsets, 8 bytes per example and feature).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time

import numpy as np
import tqdm
from absl import logging

from flaxformer_lite import files
from flaxformer_lite.data.pipeline import text_of

CHUNK = 8192  # examples read and encoded at a time
VERSION = 1


def cache_name(split: str, model_path: str, source_id: str, features: dict[str, str]) -> str:
    """`<split>-<digest>`: the digest of the tokenizer's bytes, the split's files and the features."""
    h = hashlib.sha256()
    with open(model_path, "rb") as f:
        h.update(f.read())
    h.update(json.dumps([VERSION, source_id, sorted(features.items())]).encode())
    return f"{split}-{h.hexdigest()[:16]}"


def source_id(source) -> str:
    """What identifies a prepared split: its files' paths, sizes and record counts (CheckedSource)."""
    paths = getattr(source, "paths", [])
    described = [(p, os.path.getsize(p) if os.path.exists(p) else -1) for p in paths]
    return json.dumps([described, len(source)])


def build(source, sp, features: dict[str, str], folder: str) -> None:
    """Tokenize every example of `source` (name -> feature to read) into `folder` (see module doc).

    A failed write (a full disk) removes what was written and raises one OSError saying so.
    """
    tmp = f"{folder}.incomplete{os.getpid()}"
    try:
        _build(source, sp, features, folder, tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, files.UnreadableFileError):
            raise
        raise OSError(
            f"writing the token cache {folder} failed ({files.reason(e)}); nothing of it was kept and "
            "the prepared data and checkpoints are untouched: free space and rerun"
        ) from e


def _build(source, sp, features: dict[str, str], folder: str, tmp: str) -> None:
    n, vocab = len(source), sp.get_piece_size()
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    byte_ids = np.array([sp.is_byte(i) for i in range(vocab)])
    offsets = {name: [np.zeros(1, np.int64)] for name in features}
    totals, byte_fallback, start = dict.fromkeys(features, 0), 0, time.time()
    bar = tqdm.tqdm(total=n, desc="tokenizing", unit=" examples", mininterval=2.0, leave=False, disable=None)
    with bar, contextlib.ExitStack() as stack:
        outs = {name: stack.enter_context(open(os.path.join(tmp, f"{name}.ids"), "wb")) for name in features}
        for lo in range(0, n, CHUNK):
            columns = _read_texts(source, lo, min(lo + CHUNK, n), list(features.values()))
            for name, texts in zip(features, columns, strict=True):
                ids = sp.encode(texts)
                lengths = np.fromiter(map(len, ids), np.int64, len(ids))
                flat = np.fromiter((t for row in ids for t in row), dtype, int(lengths.sum()))
                byte_fallback += int(byte_ids[flat].sum())
                outs[name].write(flat.tobytes())  # an OSError naming its errno on a full disk
                offsets[name].append(totals[name] + np.cumsum(lengths))
                totals[name] += int(lengths.sum())
            bar.update(len(columns[0]))
    for name in features:
        np.concatenate(offsets[name]).tofile(os.path.join(tmp, f"{name}.offsets"))
    meta = {
        "version": VERSION, "examples": n, "dtype": np.dtype(dtype).name, "features": features,
        "tokens": totals, "byte_fallback_tokens": byte_fallback,
    }  # fmt: skip
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    seconds = time.time() - start
    logging.info(
        "tokenized %d examples (%s tokens) into %s in %.0f s (%.0f examples/s)",
        n, totals, folder, seconds, n / max(seconds, 1e-9),
    )  # fmt: skip


def _read_texts(source, start: int, stop: int, features: list[str]) -> list[list[str]]:
    """One list of texts per feature for records [start, stop): raw reads where the source has them."""
    if hasattr(source, "texts"):  # datasets.CheckedSource over Text features
        rows = source.texts(start, stop, features)
    else:
        rows = [tuple(text_of(e[f]) for f in features) for e in source.__getitems__(list(range(start, stop)))]
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in features]


class TokenSource:
    """Random access to a built cache: `source[i]` is {name: int32 ids of example i (no EOS)}."""

    def __init__(self, folder: str):
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        self.folder, self.names = folder, list(self.meta["features"])
        dtype = np.dtype(self.meta["dtype"])
        self.ids, self.offsets = {}, {}
        for name in self.names:
            offsets = np.fromfile(os.path.join(folder, f"{name}.offsets"), np.int64)
            ids_path = os.path.join(folder, f"{name}.ids")
            size = os.path.getsize(ids_path) // dtype.itemsize
            if len(offsets) != self.meta["examples"] + 1 or offsets[-1] != size:
                raise ValueError(f"token cache {folder!r} is incomplete ({name}): its files do not match")
            self.offsets[name] = offsets
            # a plain ndarray over the mapped file: slicing a np.memmap costs ~4x more
            mapped = np.memmap(ids_path, dtype, "r", shape=(size,)).view(np.ndarray) if size else None
            self.ids[name] = mapped if size else np.zeros(0, dtype)

    def __len__(self) -> int:
        return self.meta["examples"]

    def __reduce__(self):  # to a worker process by its folder, not by the mapped arrays
        return TokenSource, (self.folder,)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        out = {}
        for name in self.names:
            lo, hi = self.offsets[name][i], self.offsets[name][i + 1]
            out[name] = self.ids[name][lo:hi].astype(np.int32)
        return out

    def lengths(self, name: str) -> np.ndarray:
        return np.diff(self.offsets[name])

    def __repr__(self) -> str:
        return f"TokenSource({self.folder!r}, {len(self)} examples)"


class Pieces:
    """A one-feature cache's examples cut into consecutive pieces of `length` tokens (long documents).

    An example of n ids is n + 1 tokens with its EOS; piece k holds tokens [k * length, (k + 1) *
    length) of that, so every piece but the last is `length` ids and no EOS (`ends` False), and the
    last holds the rest and the EOS (`ends` True; a last piece of only the EOS is dropped). The packer
    (`packing.PackedBatches`) reads `lengths`, `offsets`, `ids` and `ends` as it reads a TokenSource,
    appending EOS only where `ends`. Nothing of a text is cut away, where trimming keeps its first
    `length - 1` ids. Each piece is its own segment: its first token is predicted without context.
    """

    def __init__(self, cache: TokenSource, length: int):
        if len(cache.names) != 1 or length < 2:
            raise ValueError(
                f"cutting examples into pieces needs one feature (a language model's) and a length >= 2; "
                f"got features {cache.names} and length {length}: use long_examples='trim'."
            )
        self.cache, self.names, self.length = cache, cache.names, length
        self.meta = cache.meta
        name = self.names[0]
        n = cache.lengths(name)
        count = np.where(n > 0, n // length + 1 - ((n % length) == 0), 0)  # without an EOS-only piece
        example = np.repeat(np.arange(len(n)), count)  # the example of each piece
        k = np.arange(len(example)) - np.repeat(np.cumsum(count) - count, count)  # its index in it
        self.offsets = {name: cache.offsets[name][example] + k * length}
        self._lengths = np.minimum(n[example] - k * length, length)
        self.ends = (k == count[example] - 1) & (self._lengths < length)

    @property
    def ids(self) -> dict[str, np.ndarray]:
        return self.cache.ids

    def __len__(self) -> int:
        return len(self._lengths)

    def lengths(self, name: str) -> np.ndarray:
        del name  # the one feature
        return self._lengths

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        lo = self.offsets[self.names[0]][i]
        return {self.names[0]: self.cache.ids[self.names[0]][lo : lo + self._lengths[i]].astype(np.int32)}

    def __repr__(self) -> str:
        return f"Pieces({self.cache!r}, length={self.length}, {len(self)} pieces)"


def open_or_build(source, sp, model_path: str, features: dict[str, str], cache_dir: str, split: str):
    """The TokenSource of `source` tokenized by the model at `model_path`, built on first use."""
    folder = os.path.join(cache_dir, cache_name(split, model_path, source_id(source), features))
    if os.path.isdir(folder):
        try:
            return TokenSource(folder)
        except (OSError, ValueError, KeyError) as e:
            logging.warning("rebuilding the token cache %s: %s", folder, e)
    os.makedirs(cache_dir, exist_ok=True)
    build(source, sp, features, folder)
    return TokenSource(folder)
