"""Long documents (issue 39): the bible_long corpus, pieces of over-long training examples, and strided
sliding-window perplexity checked against closed forms and independent loops."""

import os
import sqlite3

import pytest

from flaxformer_lite.data import datasets
from flaxformer_lite.data.datasets import bible

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "bible_small.db")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _verses_by_chapter():
    """{(book, chapter): [cleaned verse, ...] in verse order} of WEB 2000, read with sqlite alone."""
    with sqlite3.connect(FIXTURE) as conn:
        rows = conn.execute(
            "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = '4' ORDER BY 1, 2, 3"
        ).fetchall()
    out = {}
    for b, c, _, t in rows:
        if bible.clean_verse(t):
            out.setdefault((b, c), []).append(bible.clean_verse(t))
    return out


def _split_texts(data_dir, config):
    return {
        split: [
            ex["text"].decode()
            for ex in datasets.open_source(f"bible_long/{config}", split, data_dir, db_path=FIXTURE)
        ]
        for split in ("train", "validation", "test")
    }


def test_chapters_are_their_verses_in_order_split_by_book(data_dir):
    chapters = _verses_by_chapter()
    got = _split_texts(data_dir, "chapters")
    for split, texts in got.items():
        expected = sorted(
            "\n".join(verses) for (b, _), verses in chapters.items() if bible.split_of_book(b) == split
        )
        assert sorted(texts) == expected, split
    # The fixture's books: Ruth (test), Jonah (validation), four in train; chapters as in the database.
    assert [len(got[s]) for s in ("train", "validation", "test")] == [14, 4, 4]


def test_books_are_their_chapters_in_order_and_no_book_is_in_two_splits(data_dir):
    chapters = _verses_by_chapter()
    got = _split_texts(data_dir, "books")
    books = sorted({b for b, _ in chapters})
    for split, texts in got.items():
        expected = sorted(
            "\n\n".join("\n".join(chapters[k]) for k in sorted(chapters) if k[0] == b)
            for b in books
            if bible.split_of_book(b) == split
        )
        assert sorted(texts) == expected, split
    assert [len(got[s]) for s in ("train", "validation", "test")] == [4, 1, 1]
    first_verse = {s: {t.split("\n")[0] for t in texts} for s, texts in got.items()}
    assert not (first_verse["train"] & first_verse["test"]) and not (
        first_verse["train"] & first_verse["validation"]
    )


def test_tokenizer_training_reads_long_documents_line_by_line():
    lines = [f"verse {i} " + "word " * 40 for i in range(30)]  # ~6 KB together: past SentencePiece's 4 KB
    source = [{"text": "\n".join(lines).encode()}, {"text": b"a short text\nof two lines"}]
    assert list(datasets.training_texts(source, ["text"])) == [*lines, "a short text\nof two lines"]
