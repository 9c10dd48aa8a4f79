"""Adversarial paraphrase negatives (issue 41): word swaps on hand-written sentences, and the
bible_paraphrase/adversarial split on the fixture: the same bag of words, balanced, by book,
deterministic, its positives the original config's."""

import collections
import re

import pytest

from flaxformer_lite.data import datasets
from flaxformer_lite.data.datasets import swaps
from flaxformer_lite.data.datasets.bible import split_of_book
from tests import tiny_config

LOWER = swaps.lowercase_words(["and then the son of man said to them, go; god, lord, the king and him"])


@pytest.mark.parametrize(
    "text,want",
    [
        ("Abraham came to mourn for Sarah.", ("Sarah came to mourn for Abraham.", "swap_names")),
        ("Then Moses said to Aaron, Go.", ("Then Aaron said to Moses, Go.", "swap_names")),
        # a list of names, then a name that is not in it: the first pair across a verb
        ("Moses and Aaron went in to Pharaoh", ("Pharaoh and Aaron went in to Moses", "swap_names")),
        ("the king of Israel went to the city.", ("the city of Israel went to the king.", "swap_nouns")),
        # "Son", "God", "And" are written in lower case elsewhere: not names; nouns then
        (
            "And God said to the son, Go to the man.",
            ("And God said to the man, Go to the son.", "swap_nouns"),
        ),
        ("Moses and Aaron and Miriam", None),  # only a list
        ("the sheep and the oxen", None),  # only a list
        ("Jacob's son went to Egypt", None),  # a possessive is never exchanged; one name left
        ("The LORD spoke to Moses", None),  # all capitals: not a name
        ("Moses spoke to Moses", None),  # the same word twice
    ],
)
def test_swaps_exchange_two_names_or_nouns_and_nothing_else(text, want):
    assert swaps.swap(text, LOWER) == want


def _words(text):
    """The word-overlap baseline's words: lower case, letters, digits and apostrophes."""
    return collections.Counter(re.findall(r"[a-z0-9']+", text.lower()))


def _examples(data_dir, name, split):
    source = datasets.open_source(name, split, str(data_dir), db_path=tiny_config.FIXTURE)
    return [
        {k: v.decode() if isinstance(v, bytes) else int(v) for k, v in source[i].items()}
        for i in range(len(source))
    ]


def test_adversarial_pairs_keep_the_bag_of_words_are_balanced_by_book_and_deterministic(tmp_path):
    name = "bible_paraphrase/adversarial"
    sizes = {}
    for split in ("train", "validation", "test"):
        examples = _examples(tmp_path / "a", name, split)
        assert examples == _examples(tmp_path / "b", name, split)  # prepared again: the same
        by_verse = collections.defaultdict(dict)
        for e in examples:
            assert e["key_a"] == e["key_b"] and split_of_book(int(e["key_a"].split(":")[0])) == split
            by_verse[e["key_a"]][e["label"]] = e
        assert all(len(pair) == 2 for pair in by_verse.values())  # one of each class per verse
        for pair in by_verse.values():
            negative, positive = pair[0], pair[1]
            assert negative["text_a"] == positive["text_a"] and positive["kind"] == "positive"
            assert negative["kind"] in ("swap_names", "swap_nouns")
            assert negative["text_b"] != positive["text_b"]
            assert _words(negative["text_b"]) == _words(positive["text_b"])  # every word, as often
        original = {e["key_a"]: e for e in _examples(tmp_path / "a", "bible_paraphrase", split) if e["label"]}
        assert all(original[k] == pair[1] for k, pair in by_verse.items())  # the original's positives
        sizes[split] = len(by_verse)
    assert all(sizes.values()), sizes
