"""token_cache: ids equal SentencePiece's one text at a time; keyed by tokenizer; rebuilt when damaged."""

import os

import numpy as np
import pytest

from flaxformer_lite.data import token_cache
from flaxformer_lite.data.tokenizer import train_sentencepiece

TEXTS = [
    "In the beginning God created the heavens and the earth.",
    "Im Anfang schuf Gott die Himmel und die Erde.",
    "And the earth was waste and void; and darkness was upon the face of the deep.",
    "Und die Erde war wüst und leer, und es lag Finsternis auf der Tiefe. ☃",
] * 20


class ListSource(list):
    def __getitems__(self, keys):
        return [self[k] for k in keys]


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    paths = []
    for vocab in (300, 320):
        path = str(folder / f"spm{vocab}.model")
        train_sentencepiece(TEXTS, path, vocab_size=vocab, character_coverage=0.99)
        paths.append(path)
    return paths


def _source():
    rows = [{"en": TEXTS[i % 4] + f" {i}", "de": TEXTS[(i + 1) % 4][: 5 + i % 30]} for i in range(50)]
    rows[7]["de"] = ""  # an empty text stays an empty example
    return ListSource(rows)


def test_ids_equal_single_text_encoding(spm_models, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_models[0])
    source = _source()
    cache = token_cache.open_or_build(
        source, sp, spm_models[0], {"inputs": "en", "targets": "de"}, str(tmp_path), "train"
    )
    assert len(cache) == len(source) and cache.ids["inputs"].dtype == np.uint16
    byte_pieces = 0
    for i, row in enumerate(source):
        got = cache[i]
        for name, feature in (("inputs", "en"), ("targets", "de")):
            want = sp.encode(row[feature])
            assert got[name].dtype == np.int32 and got[name].tolist() == want
            byte_pieces += sum(sp.is_byte(t) for t in want)
    assert cache[7]["targets"].size == 0
    assert cache.meta["byte_fallback_tokens"] == byte_pieces > 0  # the snowman is byte pieces


def test_another_tokenizer_gets_another_cache_and_a_damaged_one_is_rebuilt(spm_models, tmp_path):
    import sentencepiece as spm

    source, features = _source(), {"targets": "en"}
    sps = [spm.SentencePieceProcessor(model_file=p) for p in spm_models]
    a = token_cache.open_or_build(source, sps[0], spm_models[0], features, str(tmp_path), "train")
    b = token_cache.open_or_build(source, sps[1], spm_models[1], features, str(tmp_path), "train")
    assert a.folder != b.folder and len(os.listdir(tmp_path)) == 2
    assert b[3]["targets"].tolist() == sps[1].encode(source[3]["en"])
    ids_path = os.path.join(a.folder, "targets.ids")
    with open(ids_path, "r+b") as f:
        f.truncate(os.path.getsize(ids_path) - 4)  # a truncated copy
    again = token_cache.open_or_build(source, sps[0], spm_models[0], features, str(tmp_path), "train")
    assert again.folder == a.folder and again[49]["targets"].tolist() == sps[0].encode(source[49]["en"])
