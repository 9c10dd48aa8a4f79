"""TFDS builders for a user's own corpus in local files: no code needed, only a folder.

    <dir>/train.tsv, validation.tsv, test.tsv   "source<TAB>target" per line  -> tsv_translate
    <dir>/train.txt, validation.txt, test.txt   one text per line              -> text_lm

Each split may instead be `<split>.jsonl` (one JSON object per line), `<split>.parquet`, or a
`<split>/` folder of Arrow files as HuggingFace `datasets` writes them (`DatasetDict.save_to_disk`:
`<split>/data-00000-of-0000n.arrow`); `Dataset.to_json` / `to_parquet` output is read as it is. Their
columns are named by the builder's `fields` ("source,target" and "text" by default; nested ones
with dots, e.g. `--config.corpus_fields=translation.en,translation.de` for a WMT dataset saved from
the hub). Every format is streamed, never loaded whole: a corpus of any size prepares in bounded
memory (see `writer.StreamingBuilder`).

Build with `python -m flaxformer_lite.data.datasets tsv_translate --manual_dir <dir> --data_dir <data_dir>`
(or let train.py do it; the `tfds build` CLI needs TensorFlow). Training needs train; evaluating a
trained model needs only the split it evaluates (e.g. test alone).
Bad lines (not UTF-8, wrong column count, empty, longer than MAX_CHARS) are skipped, counted and
logged; a file with no usable line is an error.
"""

from __future__ import annotations

import collections
import glob
import json
import os
from collections.abc import Iterator

import tensorflow_datasets as tfds
from absl import logging

from flaxformer_lite.data.datasets.writer import StreamingBuilder

MAX_CHARS = 20_000  # longer lines are skipped: no sentence is this long, a broken file often is
SPLITS = ("train", "validation", "test")
COLUMNAR = (".jsonl", ".parquet", "")  # "" = a folder of HuggingFace Arrow files


class BadCorpusError(ValueError):
    """A corpus file that cannot be used at all (missing, empty, nothing valid in it)."""


class _Skips:
    """Counts of skipped lines by reason, with the first line of each; reported once at the end."""

    def __init__(self, path: str):
        self.path, self.counts, self.first = path, collections.Counter(), {}

    def add(self, reason: str, lineno: int) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, lineno)

    def detail(self) -> str:
        return ", ".join(f"{n} {r} (first at line {self.first[r]})" for r, n in self.counts.items())

    def finish(self, used: int) -> None:
        if self.counts:
            logging.warning("%s: skipped %d lines: %s", self.path, sum(self.counts.values()), self.detail())
        if not used:
            why = f" ({self.detail()})" if self.counts else ""
            raise BadCorpusError(f"corpus file {self.path!r} has no usable lines{why}.")


def _check(fields: tuple, num_fields: int) -> str | None:
    """Why a row of stripped fields is unusable, or None."""
    if len(fields) != num_fields:
        return f"{len(fields)} tab-separated fields instead of {num_fields}"
    if not all(fields):
        return "empty field"
    if sum(map(len, fields)) > MAX_CHARS:
        return f"longer than {MAX_CHARS} characters"
    return None


def iter_lines(path: str, num_fields: int, skips: _Skips | None = None) -> Iterator[tuple[str, ...]]:
    """Usable lines of a text file as tuples of `num_fields` stripped tab-separated fields, streamed.

    Skipped lines are counted and logged when the file ends; a file without one usable line raises
    BadCorpusError then (so a preparation fails before anything is marked prepared).
    """
    if not os.path.isfile(path):
        raise BadCorpusError(f"corpus file {path!r} does not exist; create it or fix the path.")
    skips, used = skips or _Skips(path), 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                skips.add("not UTF-8", lineno)
                continue
            fields = tuple(x.strip() for x in line.split("\t"))
            reason = f"longer than {MAX_CHARS} characters" if len(line) > MAX_CHARS else None
            reason = reason or _check(fields, num_fields)
            if reason:
                skips.add(reason, lineno)
            else:
                used += 1
                yield fields
    skips.finish(used)


def read_lines(path: str, num_fields: int) -> tuple[list[tuple[str, ...]], collections.Counter]:
    """All usable lines of `path` in a list, and counts of skips (small files: classification)."""
    skips = _Skips(path)
    return list(iter_lines(path, num_fields, skips)), skips.counts


def _arrow_batches(path: str, batch_rows: int = 65_536):
    """Record batches of a .jsonl file, a .parquet file or a folder of HF Arrow files, streamed."""
    import pyarrow as pa

    if path.endswith(".jsonl"):
        import pyarrow.json

        yield from pyarrow.json.open_json(path)
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
    else:
        arrow_files = sorted(glob.glob(os.path.join(path, "*.arrow")))
        if not arrow_files:
            raise BadCorpusError(f"{path!r} is a folder without .arrow files (HF save_to_disk writes them).")
        for name in arrow_files:
            with pa.memory_map(name) as source:
                yield from pa.ipc.open_stream(source)


def _flat(batch):
    """A table of the record batch with nested struct columns flattened to dotted names."""
    import pyarrow as pa

    table = pa.Table.from_batches([batch])
    while any(pa.types.is_struct(t) for t in table.schema.types):
        table = table.flatten()  # translation: {en, de} -> translation.en, translation.de
    return table


def iter_records(path: str, fields: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Usable rows of a columnar file (see `_arrow_batches`) as tuples of the named text fields.

    Rows with a missing (null) or empty field, or longer than MAX_CHARS, are skipped and counted;
    a named column the file lacks is an error that lists the columns it has.
    """
    skips, used, row = _Skips(path), 0, 0
    import pyarrow as pa

    try:
        for batch in _arrow_batches(path):
            batch = _flat(batch)
            missing = [f for f in fields if f not in batch.schema.names]
            if missing:
                raise BadCorpusError(
                    f"{path!r} has no column {missing[0]!r}; its columns are {batch.schema.names}. Name "
                    "the text columns with --config.corpus_fields (e.g. translation.en,translation.de)."
                )
            columns = [batch.column(f).to_pylist() for f in fields]
            for values in zip(*columns, strict=True):
                row += 1
                texts = tuple("" if v is None else str(v).strip() for v in values)
                reason = _check(texts, len(fields))
                if reason:
                    skips.add(reason, row)
                else:
                    used += 1
                    yield texts
    except (pa.ArrowInvalid, OSError, json.JSONDecodeError) as e:
        raise BadCorpusError(f"cannot read {path!r} near row {row + 1}: {e}") from e
    skips.finish(used)


class _LocalFilesBuilder(StreamingBuilder):
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    SUFFIX = ""
    FIELDS = ("text",)

    def __init__(self, *, fields: str = "", **kwargs):
        self._fields = tuple(f.strip() for f in fields.split(",")) if fields else self.FIELDS
        if len(self._fields) != len(self.FIELDS):
            raise ValueError(
                f"bad config: corpus_fields={fields!r} names {len(self._fields)} columns; "
                f"{type(self).name} reads {len(self.FIELDS)} ({','.join(self.FIELDS)})."
            )
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        folder = str(dl_manager.manual_dir)
        found = {}
        for split in SPLITS:
            candidates = [os.path.join(folder, split + s) for s in (self.SUFFIX, *COLUMNAR)]
            existing = [
                p for p in candidates if os.path.isfile(p) or (p.endswith(split) and os.path.isdir(p))
            ]
            if len(existing) > 1:
                raise BadCorpusError(f"corpus folder {folder!r} has {existing}: keep one file per split.")
            if existing:
                found[split] = existing[0]
        if not found:
            names = ", ".join(s + self.SUFFIX for s in SPLITS)
            raise BadCorpusError(
                f"corpus folder {folder!r} has none of {names} (or .jsonl, .parquet, or an Arrow "
                "folder per split); add at least one."
            )
        return {split: self._generate_examples(self._rows(path)) for split, path in found.items()}

    def _rows(self, path: str):
        if path.endswith(self.SUFFIX) and os.path.isfile(path):
            return iter_lines(path, len(self.FIELDS))
        return iter_records(path, self._fields)


class TsvTranslate(_LocalFilesBuilder):
    """Sentence pairs from local `{train,validation,test}.tsv` files ("source<TAB>target")."""

    SUFFIX = ".tsv"
    FIELDS = ("source", "target")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"source": tfds.features.Text(), "target": tfds.features.Text()}
            ),
            supervised_keys=("source", "target"),
        )

    def _generate_examples(self, rows):
        for i, (source, target) in enumerate(rows):
            yield i, {"source": source, "target": target}


class TextLm(_LocalFilesBuilder):
    """Texts for language modelling from local `{train,validation,test}.txt` files, one per line."""

    SUFFIX = ".txt"

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _generate_examples(self, rows):
        for i, (text,) in enumerate(rows):
            yield i, {"text": text}
