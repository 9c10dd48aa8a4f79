"""Your own labelled texts for classification: a folder of `{train,validation,test}.tsv` files.

    text<TAB>label                 one text per line (e.g. sentiment)
    text_a<TAB>text_b<TAB>label    a pair per line (e.g. paraphrase, entailment)

The column count is the one most lines of the first file have; the class names are every label
seen in any split, sorted (numerically if all are integers), so ids agree across splits. Bad lines
(not UTF-8, another column count, an empty field, too long) are skipped, counted and logged, as
`tsv_translate` does.
"""

from __future__ import annotations

import collections
import os

import tensorflow_datasets as tfds

from flaxformer_lite.data.datasets.text_files import SPLITS, BadCorpusError, read_lines


def _column_count(path: str, sample: int = 1000) -> int:
    """2 or 3: the tab-separated field count most of the first `sample` lines of `path` have."""
    counts = collections.Counter()
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            if i >= sample:
                break
            counts[raw.count(b"\t") + 1] += 1
    best = max((2, 3), key=lambda n: counts[n])
    if not counts[best]:
        raise BadCorpusError(
            f"{path!r} has no line of 2 or 3 tab-separated fields; write text<TAB>label or "
            "text_a<TAB>text_b<TAB>label per line."
        )
    return best


def class_names(labels) -> list[str]:
    """Sorted distinct labels; numerically when every label is an integer (so "10" follows "9")."""
    names = set(labels)
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return sorted(names, key=int) if numeric else sorted(names)


class TsvClassify(tfds.core.GeneratorBasedBuilder):
    """Labelled texts or text pairs from local `{train,validation,test}.tsv` files."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _info(self):
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                # text_b is "" for single texts; the label names are set when prepared (from the files)
                {"text_a": text, "text_b": text, "label": tfds.features.ClassLabel()}
            )
        )

    def _split_generators(self, dl_manager):
        folder = str(dl_manager.manual_dir)
        paths = {s: os.path.join(folder, f"{s}.tsv") for s in SPLITS}
        paths = {s: p for s, p in paths.items() if os.path.exists(p)}
        if not paths:
            raise BadCorpusError(f"corpus folder {folder!r} has none of train.tsv, validation.tsv, test.tsv.")
        fields = _column_count(next(iter(paths.values())))
        rows = {s: read_lines(p, fields)[0] for s, p in paths.items()}
        names = class_names(r[-1] for split_rows in rows.values() for r in split_rows)
        self.info.features["label"].names = names
        return {s: self._generate_examples(r, names) for s, r in rows.items()}

    def _generate_examples(self, rows, names):
        ids = {n: i for i, n in enumerate(names)}
        for i, row in enumerate(rows):
            a, b = (row[0], row[1]) if len(row) == 3 else (row[0], "")
            yield i, {"text_a": a, "text_b": b, "label": ids[row[-1]]}
