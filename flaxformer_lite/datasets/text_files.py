"""TFDS builders for a user's own corpus in local files: no code needed, only a folder.

    <dir>/train.tsv, validation.tsv, test.tsv   "source<TAB>target" per line  -> tsv_translate
    <dir>/train.txt, validation.txt, test.txt   one text per line              -> text_lm

Build with `python -m flaxformer_lite.datasets tsv_translate --manual_dir <dir> --data_dir <data_dir>`
(or let train.py do it; the `tfds build` CLI needs TensorFlow). Training needs train; evaluating a
trained model needs only the split it evaluates (e.g. test alone).
Bad lines (not UTF-8, wrong column count, empty, longer than MAX_CHARS) are skipped, counted and
logged; a file with no usable line is an error.
"""

from __future__ import annotations

import collections
import os

import tensorflow_datasets as tfds
from absl import logging

MAX_CHARS = 20_000  # longer lines are skipped: no sentence is this long, a broken file often is
SPLITS = ("train", "validation", "test")


class BadCorpusError(ValueError):
    """A corpus file that cannot be used at all (missing, empty, nothing valid in it)."""


def read_lines(path: str, num_fields: int) -> tuple[list[tuple[str, ...]], collections.Counter]:
    """Usable lines of `path` as tuples of `num_fields` stripped fields, and counts of skips."""
    if not os.path.isfile(path):
        raise BadCorpusError(f"corpus file {path!r} does not exist; create it or fix the path.")
    rows, skipped, first_bad = [], collections.Counter(), {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            reason = None
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                reason = "not UTF-8"
            if reason is None:
                fields = tuple(x.strip() for x in line.split("\t"))
                if len(line) > MAX_CHARS:
                    reason = f"longer than {MAX_CHARS} characters"
                elif len(fields) != num_fields:
                    reason = f"{len(fields)} tab-separated fields instead of {num_fields}"
                elif not all(fields):
                    reason = "empty field"
            if reason is None:
                rows.append(fields)
            else:
                skipped[reason] += 1
                first_bad.setdefault(reason, lineno)
    if skipped:
        detail = ", ".join(f"{n} {r} (first at line {first_bad[r]})" for r, n in skipped.items())
        logging.warning("%s: skipped %d lines: %s", path, sum(skipped.values()), detail)
    if not rows:
        why = f" ({detail})" if skipped else ""
        raise BadCorpusError(f"corpus file {path!r} has no usable lines{why}.")
    return rows, skipped


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    SUFFIX = ""
    NUM_FIELDS = 1

    def _split_generators(self, dl_manager):
        folder = str(dl_manager.manual_dir)
        paths = {split: os.path.join(folder, split + self.SUFFIX) for split in SPLITS}
        paths = {split: path for split, path in paths.items() if os.path.exists(path)}
        if not paths:
            names = ", ".join(s + self.SUFFIX for s in SPLITS)
            raise BadCorpusError(f"corpus folder {folder!r} has none of {names}; add at least one.")
        return {
            split: self._generate_examples(read_lines(path, self.NUM_FIELDS)[0])
            for split, path in paths.items()
        }


class TsvTranslate(_LocalFilesBuilder):
    """Sentence pairs from local `{train,validation,test}.tsv` files ("source<TAB>target")."""

    SUFFIX = ".tsv"
    NUM_FIELDS = 2

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
