"""Long documents (issue 39): the bible_long corpus, pieces of over-long training examples, and strided
sliding-window perplexity checked against closed forms and independent loops."""

import functools
import os
import sqlite3

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import long_doc
from flaxformer_lite import config, sharding, tasks
from flaxformer_lite.data import datasets, packing, token_cache
from flaxformer_lite.data import pipeline as ip
from flaxformer_lite.data.datasets import bible
from flaxformer_lite.evaluation import long_documents, run
from flaxformer_lite.ids import EOS_ID
from flaxformer_lite.model.models import DecoderOnly
from flaxformer_lite.train import experiment, loop

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


# ------------------------------------------------------------------------------ pieces of long texts


class _WordIds:
    """A stand-in tokenizer: each space-separated word is its integer value."""

    def get_piece_size(self):
        return 1000

    def is_byte(self, i):
        return False

    def encode(self, texts):
        return [[int(w) for w in t.split()] for t in texts]


class _Rows(list):
    def __getitems__(self, keys):
        return [self[k] for k in keys]


@pytest.fixture
def long_texts(tmp_path):
    """A cache of texts of 0, 1, L - 1, L, L + 1, 2L and 3L + 5 ids (L = 8), ids 3.. distinct across texts."""
    sizes, texts, next_id = [0, 1, 7, 8, 9, 16, 29], [], 3
    for n in sizes:
        texts.append(list(range(next_id, next_id + n)))
        next_id += n
    token_cache.build(
        _Rows({"text": " ".join(map(str, t))} for t in texts),
        _WordIds(),
        {"targets": "text"},
        str(tmp_path / "c"),
    )
    return token_cache.TokenSource(str(tmp_path / "c")), texts


def test_pieces_are_the_texts_cut_consecutively_with_eos_only_at_the_end(long_texts):
    cache, texts = long_texts
    pieces = token_cache.Pieces(cache, 8)
    got = [
        [int(i) for i in pieces[j]["targets"]] + ([EOS_ID] if pieces.ends[j] else [])
        for j in range(len(pieces))
    ]
    # Closed form: a text's ids + EOS in runs of 8, an EOS-only last run dropped.
    want = []
    for ids in texts:
        if ids:
            stream = ids + [EOS_ID]
            runs = [stream[i : i + 8] for i in range(0, len(stream), 8)]
            want += runs[:-1] if runs[-1] == [EOS_ID] else runs
    assert got == want
    assert max(len(r) for r in got) == 8 and list(pieces.lengths("targets")) == [
        len(r) - (r[-1] == EOS_ID) for r in got
    ]


def test_packed_pieces_hold_every_token_of_every_text(long_texts):
    cache, texts = long_texts
    pieces = token_cache.Pieces(cache, 8)
    order = packing.EpochOrder(len(pieces), seed=0, shuffle=False, rows=4)
    batches = iter(packing.PackedBatches(pieces, order, batch_size=4, max_length=8, max_segments=None))
    segments = []
    while len(segments) < len(pieces):
        batch = next(batches)
        for row in range(4):
            ids, seg, pos = (
                batch["targets"][row],
                batch["targets_segment_ids"][row],
                batch["targets_positions"][row],
            )
            for s in range(1, seg.max() + 1):
                assert list(pos[seg == s]) == list(range((seg == s).sum()))
                segments.append([int(i) for i in ids[seg == s]])
    # In stream order each text reads back whole: its ids, then EOS unless its length is a multiple of 8.
    stream = [i for s in segments[: len(pieces)] for i in s]
    want = [i for ids in texts if ids for i in ids + ([EOS_ID] if len(ids) % 8 else [])]
    assert sorted(stream) == sorted(want) and stream.count(EOS_ID) == want.count(EOS_ID)
    assert ip.FromCache(pieces, 8).stats.trimmed == 0 and ip.FromCache(cache, 8).stats.trimmed == 4


# ------------------------------------------------------------------------------ strided perplexity


@pytest.mark.parametrize(
    "n,window,stride", [(1, 8, 8), (8, 8, 3), (9, 8, 8), (50, 8, 3), (50, 8, 1), (37, 12, 5)]
)
def test_every_target_is_scored_once_with_window_minus_stride_context(n, window, stride):
    plan = long_documents.plan_windows(n, window, stride)
    scored = np.concatenate([np.arange(first, end) for _, end, first in plan])
    np.testing.assert_array_equal(scored, np.arange(n))  # once each, in order
    # Closed forms: begins at multiples of the stride, ceil((n - window) / stride) + 1 windows.
    assert len(plan) == (1 if n <= window else -(-(n - window) // stride) + 1)
    np.testing.assert_array_equal(plan[:, 0], stride * np.arange(len(plan)))
    np.testing.assert_array_equal(plan[:, 1], np.minimum(plan[:, 0] + window, n))
    for begin, end, first in plan[1:]:
        assert first - begin == window - stride or end == n  # the last window may score fewer
        assert first - begin >= window - stride
    assert plan[0, 2] == 0


def _tiny_lm(position="learned"):
    model = DecoderOnly(config.tiny(vocab_size=67, position=position, max_len=16))
    params = model.init(jax.random.key(1), jnp.zeros((1, 16), jnp.int32))["params"]
    return model, params


@functools.cache
def _apply(model):
    return jax.jit(model.apply)  # compiled once per window length: a few lengths, many windows


def _log_probs(model, params, inputs):
    """One sequence through the model alone (no padding, no batching) -> float64 log-probs [T, V]."""
    positions = jnp.arange(len(inputs))[None]
    logits = np.asarray(_apply(model)({"params": params}, jnp.asarray(inputs)[None], positions=positions)[0])
    logits = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _streams(seed, lengths):
    rng = np.random.default_rng(seed)
    return [np.concatenate([[0], rng.integers(3, 67, n), [EOS_ID]]).astype(np.int32) for n in lengths]


def _strided(model, params, streams, window, stride, batch_size=8):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    return long_documents.strided_nll(
        params, model, tasks.LM, streams, window=window, stride=stride, batch_size=batch_size, mesh=mesh
    )


def test_stride_equal_to_window_is_the_perplexity_of_separate_chunks():
    model, params = _tiny_lm()
    streams = _streams(0, [47, 15])  # 48 and 16 targets: whole chunks, one compiled length
    nll, count = 0.0, 0
    for s in streams:  # each chunk of 16 targets evaluated as a sequence of its own
        for lo in range(0, len(s) - 1, 16):
            chunk_in, chunk_out = s[lo : lo + 16], s[lo + 1 : lo + 17]
            logp = _log_probs(model, params, chunk_in[: len(chunk_out)])
            nll -= logp[np.arange(len(chunk_out)), chunk_out].sum()
            count += len(chunk_out)
    got = _strided(model, params, streams, 16, 16)
    assert got["tokens"] == count == sum(len(s) - 1 for s in streams)
    np.testing.assert_allclose(got["nll_sum"], nll, rtol=1e-5)


@pytest.mark.parametrize("window,stride,position", [(16, 5, "learned"), (12, 1, "rope"), (16, 11, "alibi")])
def test_strided_nll_equals_a_loop_over_windows_scored_by_hand(window, stride, position):
    """The transformers docs' loop, one window at a time through the model, log-softmax in numpy."""
    model, params = _tiny_lm(position)
    streams = _streams(1, [3, 29, 50])
    nll, count, windows = 0.0, 0, 0
    for s in streams:
        targets, previous_end, begin = s[1:], 0, 0
        while True:
            end = min(begin + window, len(targets))
            logp = _log_probs(model, params, s[begin:end])
            for j in range(previous_end, end):  # the targets not scored by an earlier window
                nll -= logp[j - begin, targets[j]]
                count += 1
            windows, previous_end, begin = windows + 1, end, begin + stride
            if end == len(targets):
                break
    got = _strided(model, params, streams, window, stride, batch_size=8)
    assert (got["tokens"], got["windows"]) == (count, windows)
    np.testing.assert_allclose(got["nll_sum"], nll, rtol=1e-5)


def test_a_longer_window_than_the_learned_positions_is_refused():
    model, params = _tiny_lm()
    with pytest.raises(ValueError, match="window 32 is longer than the model's 16 learned positions"):
        _strided(model, params, _streams(0, [40]), 32, 8)


# ------------------------------------------------------------------------------ configs/long_doc.py


def _long_doc_config(data_dir, **changes):
    c = long_doc.get_config()
    c.model.overrides.update({"d_model": 32, "num_heads": 4, "d_ff": 64, "num_decoder_layers": 1})
    c.update(db_path=FIXTURE, data_dir=data_dir, vocab_size=400, max_length=32, batch_size=8, **changes)
    return c


def test_long_doc_trains_on_pieces_of_whole_chapters(data_dir, tmp_path):
    exp = experiment.build(_long_doc_config(data_dir), str(tmp_path))
    batch = next(iter(exp.train_dataset()))
    full_rows = 0
    for ids, seg in zip(batch["targets"], batch["targets_segment_ids"], strict=True):
        for s in range(1, seg.max() + 1):
            piece = ids[seg == s]
            assert len(piece) <= 32
            full_rows += len(piece) == 32 and piece[-1] != EOS_ID  # impossible when texts are trimmed
    assert full_rows > 0
    trimmed = experiment.build(_long_doc_config(data_dir, long_examples="trim"), str(tmp_path))
    assert all(row[seg > 0][-1] == EOS_ID for row, seg in _rows(next(iter(trimmed.train_dataset()))))
    for changes, message in [
        (dict(pack=False), "long_examples='split' cuts the token cache's texts into packed pieces"),
        (dict(long_examples="cut"), "long_examples='cut'; use 'trim' or 'split'"),
    ]:
        with pytest.raises(ValueError, match=message):
            experiment.build(_long_doc_config(data_dir, **changes), str(tmp_path)).train_dataset()


def _rows(batch):
    return zip(batch["targets"], batch["targets_segment_ids"], strict=True)


@pytest.mark.slow
def test_eval_prints_strided_and_memory_perplexity_of_whole_held_out_chapters(data_dir, tmp_path, capsys):
    config = _long_doc_config(data_dir, num_train_steps=4, checkpoint_every=4, async_checkpoints=False)
    config.model.overrides.position = "rope"  # memory needs positions relative to the segment
    config.long_document_strides = "16,32"
    config.long_document_memory = "0,32"
    loop.train_and_evaluate(config, str(tmp_path))
    summary = run.evaluate_workdir(
        config, str(tmp_path), "test", beams=1, alpha=0.6, max_examples=0, batch_size=0
    )
    run.print_summary(summary)
    sp = experiment.build(config, str(tmp_path), tokenizer="load").tokenizer
    chapters = [t for t in _split_texts(data_dir, "chapters")["test"]]
    tokens = sum(len(sp.encode(t)) + 1 for t in chapters)  # every token of every chapter, and its EOS
    got = summary["long_documents"]
    assert (got["documents"], got["document_tokens"], got["window"]) == (len(chapters), tokens, 32)
    for stride in ("16", "32"):
        assert got["strided"][stride]["tokens"] == tokens
    assert got["strided"]["16"]["windows"] > got["strided"]["32"]["windows"]
    # Memory 0 reads the documents in independent segments of 32: the strided pass with stride = window
    # (another implementation) scores the same tokens from the same contexts.
    assert {m: r["tokens"] for m, r in got["memory"].items()} == {"0": tokens, "32": tokens}
    assert got["memory"]["0"]["nll"] == pytest.approx(got["strided"]["32"]["nll"], rel=1e-5)
    out = capsys.readouterr().out
    assert "long documents (4 whole documents" in out and "segments of 32 with memory 32: perplexity" in out


@pytest.mark.hf
@pytest.mark.parametrize("stride", [5, 15])
def test_strided_perplexity_of_an_imported_gpt2_equals_the_transformers_docs_loop(stride, tmp_path):
    """The docs' loop (window L, labels -100 on the context) on a random GPT-2 with torch, against our
    window L - 1 on the same ids: transformers feeds L tokens to score at most L - 1 of them."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flaxformer_lite import interop

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(hf_config).eval().save_pretrained(tmp_path, safe_serialization=True)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = np.random.default_rng(0).integers(0, 101, 70)
    window, nll_sum, n_tokens, prev_end = 16, 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        input_ids = torch.tensor(ids[None, begin:end])
        target_ids = input_ids.clone()
        target_ids[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target_ids).loss.item()  # the mean over the scored labels
        scored = int((target_ids[:, 1:] != -100).sum())  # labels shift by one: position 0 never scores
        nll_sum, n_tokens, prev_end = nll_sum + loss * scored, n_tokens + scored, end
        if end == len(ids):
            break
    cfg, params = interop.from_hf(str(tmp_path))
    got = _strided(DecoderOnly(cfg), params, [ids.astype(np.int32)], window - 1, stride)
    assert got["tokens"] == n_tokens == len(ids) - 1
    np.testing.assert_allclose(got["nll_sum"], nll_sum, rtol=1e-5)
