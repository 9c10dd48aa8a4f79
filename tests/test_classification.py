"""Classification (issue 30): pooling, scores, a tiny model learning, starting from an MLM workdir,
the Bible classification builders' splits, tsv_classify, eval.py and generate.py."""

import collections
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from flaxformer_lite import ops, tasks
from flaxformer_lite.config import tiny
from flaxformer_lite.data import datasets
from flaxformer_lite.data.datasets.bible import split_of_book
from flaxformer_lite.evaluation import run as eval_run
from flaxformer_lite.generation import interactive
from flaxformer_lite.model.models import DecoderOnly, EncoderOnly
from flaxformer_lite.ops import pooling
from flaxformer_lite.tasks import classification
from flaxformer_lite.train import experiment, loop
from tests import tiny_config

FIXTURE = tiny_config.FIXTURE


# ------------------------------------------------------------------------------ pooling


def _numpy_pool(hidden, segment_ids, how, num_segments):
    """Loops: each sequence's first / last token or mean, and whether it exists."""
    b_, _, d = hidden.shape
    out, present = np.zeros((b_, num_segments, d)), np.zeros((b_, num_segments))
    for b in range(b_):
        for s in range(num_segments):
            idx = [t for t, seg in enumerate(segment_ids[b]) if seg == s + 1]
            if idx:
                present[b, s] = 1
                rows = {
                    "first": hidden[b, idx[0]],
                    "last": hidden[b, idx[-1]],
                    "mean": hidden[b, idx].mean(0),
                }
                out[b, s] = rows[how]
    return out, present


SEGMENTS = np.array(
    [
        [1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0],  # packed, padded at the end
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # one sequence, padded
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # one sequence filling the row
        [1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2],  # the last sequence ends at the row's end
        [1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0],  # one-token sequences
    ],
    np.int32,
)


@pytest.mark.parametrize("how", ["first", "last", "mean"])
def test_pooling_picks_each_sequences_token_in_packed_and_padded_rows(how):
    hidden = np.random.default_rng(0).normal(size=(5, 11, 7)).astype(np.float32)
    want, want_present = _numpy_pool(hidden, SEGMENTS, how, 3)
    weights = pooling.pooling_weights(jnp.asarray(SEGMENTS), how, 3)
    np.testing.assert_allclose(pooling.pool(jnp.asarray(hidden), weights), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pooling.present_segments(jnp.asarray(SEGMENTS), 3), want_present)
    labels = np.where(SEGMENTS > 0, SEGMENTS * 10 + 1, 0)  # constant within each sequence
    got = pooling.segment_values(jnp.asarray(labels), jnp.asarray(SEGMENTS), 3)
    np.testing.assert_array_equal(got, np.where(want_present > 0, np.arange(1, 4) * 10 + 1, 0))


def _packed_batch(seqs, length):
    """One row holding `seqs` back to back (positions restart), and each alone in its own row."""
    ids, seg, pos = (np.zeros((1, length), np.int32) for _ in range(3))
    start = 0
    for s, seq in enumerate(seqs, 1):
        ids[0, start : start + len(seq)], seg[0, start : start + len(seq)] = seq, s
        pos[0, start : start + len(seq)] = np.arange(len(seq))
        start += len(seq)
    alone, alone_seg = np.zeros((len(seqs), length), np.int32), np.zeros((len(seqs), length), np.int32)
    for r, seq in enumerate(seqs):
        alone[r, : len(seq)], alone_seg[r, : len(seq)] = seq, 1
    as_batch = lambda i, s, p: {  # noqa: E731
        "targets": i, "targets_segment_ids": s, "targets_positions": p, "token_types": np.zeros_like(i),
        "labels": np.zeros_like(i),
    }  # fmt: skip
    alone_pos = np.where(alone_seg > 0, np.arange(length), 0).astype(np.int32)
    return as_batch(ids, seg, pos), as_batch(alone, alone_seg, alone_pos)


@pytest.mark.parametrize(
    "task,pool", [("classify", "auto"), ("classify_causal", "auto"), ("classify_causal", "mean")]
)
def test_a_packed_rows_logits_equal_each_sequence_classified_alone(task, pool):
    """The model-level check: packing changes nothing a sequence's prediction reads."""
    cfg = tiny(num_classes=3, max_segments=3, deterministic=True, type_vocab_size=2, pooling=pool)
    t = tasks.get(task)
    model = t.model_class(cfg)
    seqs = [[0, 5, 9, 1], [0, 7, 8, 11, 12, 1], [0, 20, 1]]  # [CLS] is id 0: segment ids mark the text
    packed, alone = _packed_batch(seqs, 17)
    params = t.init(model, jax.random.key(0), packed)["params"]
    got = t.forward(model, params, packed, jax.random.key(1))[0][0]  # [S, C]
    want = t.forward(model, params, alone, jax.random.key(1))[0][:, 0]  # each row's sequence 1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ scores


def test_accuracy_and_f1_equal_hand_worked_cases():
    # binary: tp 2, fp 1, fn 1 -> F1 = 2*2 / (2*2 + 1 + 1) = 2/3; 4 of 6 right
    got = classification.scores([1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0], 2)
    assert got["accuracy"] == pytest.approx(4 / 6) and got["f1"] == pytest.approx(2 / 3)
    # 3 classes, macro: class 0 (tp 1, fp 1, fn 1) 1/2, class 1 (tp 2, fp 1) 4/5, class 2 (tp 1, fn 1) 2/3
    got = classification.scores([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], 3)
    assert got["accuracy"] == pytest.approx(4 / 6) and got["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # a class that never occurs is left out of the macro mean (scikit-learn's labels=unique(y, pred))
    got = classification.scores([0, 1, 1], [0, 1, 0], 4)
    assert got["f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    # binary with no positive predicted: F1 0
    assert classification.scores([1, 0], [0, 0], 2)["f1"] == 0.0


# ------------------------------------------------------------------------------ learning


def _separable_batch(rng, rows, length=16, per_row=2, seq_len=7):
    """Rows of `per_row` packed sequences [CLS, 5 words, SEP]; class c draws its words from block c."""
    names = ("targets", "targets_segment_ids", "targets_positions", "token_types", "labels")
    batch = {k: np.zeros((rows, length), np.int32) for k in names}
    for r in range(rows):
        for s in range(per_row):
            c = int(rng.integers(3))
            span = slice(s * seq_len, (s + 1) * seq_len)
            batch["targets"][r, span] = [0, *rng.integers(4 + 21 * c, 25 + 21 * c, 5), 1]
            batch["targets_segment_ids"][r, span] = s + 1
            batch["targets_positions"][r, span] = np.arange(seq_len)
            batch["labels"][r, span] = c
    return batch


@pytest.mark.parametrize("task", ["classify", "classify_causal"])
def test_a_tiny_model_learns_a_separable_task_to_full_accuracy(task):
    t = tasks.get(task)
    model = t.model_class(tiny(num_classes=3, max_segments=2))
    rng = np.random.default_rng(0)
    params = t.init(model, jax.random.key(0), _separable_batch(rng, 2))["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, key):
        def loss(p):
            logits, labels, weights = t.forward(model, p, batch, key)
            total, _, _, denom = ops.token_losses(logits, labels, weights)
            return total / denom

        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    for i in range(150):
        params, opt = step(params, opt, _separable_batch(rng, 16), jax.random.key(i))
    test = _separable_batch(np.random.default_rng(1), 32)
    inference = model.clone(config=model.config.replace(deterministic=True))
    probs, labels, present = classification.probabilities(inference, params, test)
    assert np.all(np.asarray(present) == 1)
    assert np.mean(np.argmax(probs, -1) == np.asarray(labels)) == 1.0


def test_a_frozen_body_gets_no_update_and_the_head_does():
    model = EncoderOnly(tiny(num_classes=3, max_segments=2))
    batch = _separable_batch(np.random.default_rng(0), 4)
    params = tasks.CLASSIFY.init(model, jax.random.key(0), batch)["params"]

    def loss(p):
        logits, labels, weights = tasks.CLASSIFY.forward(model, p, batch, jax.random.key(1))
        return ops.token_losses(logits, labels, weights)[0]

    tx = classification.freeze_body(optax.adam(1e-2))
    updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
    for name, sub in updates.items():
        moved = any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(sub))
        assert moved == (name in classification.HEAD_PARAMS), name


# ------------------------------------------------------------------------------ data


def test_paraphrase_splits_share_no_verse_and_labels_are_balanced(tmp_path):
    seen = {}
    for split in ("train", "validation", "test"):
        source = datasets.open_source("bible_paraphrase", split, str(tmp_path), db_path=FIXTURE)
        examples = [source[i] for i in range(len(source))]
        keys = {e[k].decode() for e in examples for k in ("key_a", "key_b")}
        assert all(split_of_book(int(k.split(":")[0])) == split for k in keys)
        for other, other_keys in seen.items():
            assert not keys & other_keys, (split, other)
        seen[split] = keys
        labels = collections.Counter(int(e["label"]) for e in examples)
        assert labels[0] == labels[1] > 0
        for e in examples:
            a, b = e["key_a"].decode().split(":"), e["key_b"].decode().split(":")
            assert (a == b) == (e["label"] == 1) and e["text_a"] != e["text_b"]
            if e["kind"] == b"hard":  # same chapter, near
                assert a[:2] == b[:2] and abs(int(a[2]) - int(b[2])) <= 5
        kinds = collections.Counter(e["kind"] for e in examples)
        assert kinds[b"hard"] >= kinds[b"random"] - 1 > 0  # about half the negatives are hard


def test_version_task_splits_by_book(tmp_path):
    seen = set()
    for split in ("train", "validation", "test"):
        source = datasets.open_source("bible_version", split, str(tmp_path), db_path=FIXTURE)
        keys = {source[i]["key"].decode() for i in range(len(source))}
        assert keys and not keys & seen and all(split_of_book(int(k.split(":")[0])) == split for k in keys)
        seen |= keys


@pytest.mark.parametrize("pair", [False, True])
def test_tsv_classify_skips_and_counts_bad_lines(tmp_path, pair, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [(f"text {i}", f"other {i}", ["pos", "neg", "mid"][i % 3]) for i in range(30)]
    lines = ["\t".join(g if pair else (g[0], g[2])) for g in good]
    bad = ["only one field", "a\t\tpos" if pair else "\tpos", "x\ty\tz\tw"]
    (corpus / "train.tsv").write_bytes(("\n".join(lines + bad) + "\n").encode() + b"\xff\xfe\tpos\n")
    (corpus / "test.tsv").write_text("\n".join(lines[:6]) + "\n")
    data_dir = datasets.prepared_dir(str(tmp_path / "tfds"), manual_dir=str(corpus))
    with caplog.at_level("WARNING"):
        source = datasets.open_source("tsv_classify", "train", data_dir, manual_dir=str(corpus))
    assert len(source) == 30 and "skipped 4 lines" in caplog.text
    keys, names = classification.dataset_labels("tsv_classify", data_dir, manual_dir=str(corpus))
    assert names == ("mid", "neg", "pos") and list(keys) == ["text_a", "text_b"]
    first = next(source[i] for i in range(30) if source[i]["text_a"] == b"text 0")
    assert first["label"] == 2 and first["text_b"] == (b"other 0" if pair else b"")


def test_next_sentence_pairs_are_the_next_text_or_another_half_the_time():
    texts = [{"text": f"verse {i}"} for i in range(400)]
    pairs = classification.NextSentencePairs(texts, seed=3)
    labels = []
    for i in range(len(texts)):
        p = pairs[i]
        following = p["text_b"] == f"verse {i + 1}"
        assert p["text_a"] == f"verse {i}" and following == (p["label"] == 1)
        labels.append(p["label"])
    assert 0.4 < np.mean(labels) < 0.6 and pairs[7] == pairs[7]


def test_pairs_are_laid_out_as_bert_and_the_longer_text_is_trimmed_first():
    class Spaces:  # one id per word
        def encode(self, text):
            return [int(w) for w in text.split()]

    tok = classification.Tokenize(Spaces(), ["text_a", "text_b"], max_length=9)
    out = tok({"text_a": "5 6", "text_b": "7 8 9 10 11 12", "label": 1})
    np.testing.assert_array_equal(out["targets"], [0, 5, 6, 1, 7, 8, 9, 10, 1])
    np.testing.assert_array_equal(out["token_types"], [0, 0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(out["labels"], [1] * 9)
    assert tok.stats.trimmed == 1


# ------------------------------------------------------------------------------ end to end


BODY = {"num_encoder_layers": 1, "num_decoder_layers": 1, "type_vocab_size": 2, "max_segments": 4}


def _config(tmp_path, **fields):
    c = tiny_config.get_config()
    c.data_dir = str(tmp_path / "tfds")
    c.model.overrides.update(BODY)
    c.update(num_train_steps=2, checkpoint_every=2, max_length=48, log_every=1, label_smoothing=0.0, **fields)
    c.next_sentence = fields.get("next_sentence", False)
    c.init_from = fields.get("init_from", "")
    c.freeze_body = False
    return c


def _checkpoint_params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "params")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = ckptr.restore(
        path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    )
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(params)}  # fmt: skip


@pytest.mark.slow
def test_fine_tuning_an_mlm_workdir_keeps_its_body_and_eval_and_generate_classify(tmp_path):
    """BERT's recipe end to end: MLM + next-sentence pretraining, then a paraphrase classifier
    from that workdir (body bit for bit, classifier new), trained, evaluated, used on stdin."""
    mlm = str(tmp_path / "mlm")
    loop.train_and_evaluate(_config(tmp_path, task="mlm", dataset_name="bible_lm", next_sentence=True), mlm)
    pretrained = _checkpoint_params(mlm, 2)

    config = _config(tmp_path, task="classify", dataset_name="bible_paraphrase", init_from=mlm)
    work = str(tmp_path / "classify")
    exp = experiment.build(config, work)
    state, shardings = exp.init_state(jax.random.key(5))
    loaded = exp.imported_params(shardings.params, state.params)
    flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)  # noqa: E731
                         for p, v in jax.tree_util.tree_leaves_with_path(tree)}  # fmt: skip
    got, fresh = flat(loaded), flat(state.params)
    assert set(got) == set(pretrained)
    for name, value in got.items():
        want = fresh[name] if name.startswith("classifier/") else pretrained[name]
        assert value.dtype == want.dtype and np.array_equal(value, want), name
    assert not np.array_equal(got["classifier/kernel"], pretrained["classifier/kernel"])

    final = loop.train_and_evaluate(config, work)
    assert 0.0 <= final["accuracy"] <= 1.0 and np.isfinite(final["nll"])
    summary = eval_run.evaluate_workdir(
        config, work, "test", beams=1, alpha=0.6, max_examples=10, batch_size=0
    )
    assert summary["examples"] == 10 and 0.0 <= summary["f1"] <= 1.0
    prefix = summary["files"][: -len(".*")]  # <workdir>/eval/bible_paraphrase<source hash>.test
    assert prefix.startswith(os.path.join(work, "eval", "bible_paraphrase"))
    rows = open(prefix + ".predictions.tsv").read().splitlines()
    assert len(rows) == 11 and rows[0].split("\t")[-2:] == ["p(different)", "p(paraphrase)"]
    probs = np.array([[float(x) for x in r.split("\t")[-2:]] for r in rows[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)

    out, err = io.StringIO(), io.StringIO()
    counts = interactive.run(config, work, ["In the beginning\tAt first", "", "no tab here"], out, err)
    lines = out.getvalue().split("\n")
    assert counts["lines"] == 3 and lines[1] == "" and lines[0].split("\t")[0] in ("different", "paraphrase")
    assert "1 lines without a tab" in err.getvalue()


@pytest.mark.slow
def test_init_from_another_model_or_vocabulary_is_a_one_line_error(tmp_path):
    lm = str(tmp_path / "lm")
    loop.train_and_evaluate(_config(tmp_path, task="lm", dataset_name="bible_lm"), lm)
    config = _config(tmp_path, task="classify_causal", dataset_name="bible_paraphrase", init_from=lm)
    config.model.overrides.d_ff = 48
    exp = experiment.build(config, str(tmp_path / "a"))
    state, shardings = exp.init_state(jax.random.key(0))
    with pytest.raises(ValueError, match=r"d_ff=64 there but 48 here") as e:
        exp.imported_params(shardings.params, state.params)
    assert "\n" not in str(e.value)
    other = tmp_path / "b"
    other.mkdir()
    (other / "spm.model").write_bytes(b"another vocabulary")
    with pytest.raises(ValueError, match="another vocabulary than the pretrained"):
        experiment.build(config, str(other))
    config.model.overrides.d_ff = 64  # the LM's body: loads, and only the classifier is new
    exp = experiment.build(config, str(tmp_path / "c"))
    state, shardings = exp.init_state(jax.random.key(0))
    loaded = exp.imported_params(shardings.params, state.params)
    assert set(loaded) == {"token_embed", "decoder", "classifier"}
    lm_params = _checkpoint_params(lm, 2)
    np.testing.assert_array_equal(loaded["token_embed"]["embedding"], lm_params["token_embed/embedding"])
    assert isinstance(exp.model, DecoderOnly)


def _flat_names(tree) -> dict:
    return {
        "/".join(str(getattr(k, "key", k)) for k in p): v
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.mark.slow
def test_freeze_body_trains_the_body_params_the_pretrained_model_lacks(tmp_path):
    """A pretrained checkpoint without token-type embeddings: ours start fresh, so freeze_body must
    train them with the head (it froze every param outside HEAD_PARAMS, random ones included)."""
    from flax import traverse_util

    config = _config(tmp_path, task="classify", dataset_name="bible_paraphrase")
    pretrained = tmp_path / "pretrained"
    state, _ = experiment.build(config, str(pretrained)).init_state(jax.random.key(0))
    flat = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    lacking = sorted(n for n in flat if "token_types" in n)
    assert lacking  # BODY has type_vocab_size=2
    kept = traverse_util.unflatten_dict({n: v for n, v in flat.items() if n not in lacking}, sep="/")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(pretrained / "checkpoints" / "1" / "params", kept)
    ckptr.wait_until_finished()

    config = _config(tmp_path, task="classify", dataset_name="bible_paraphrase", init_from=str(pretrained))
    config.freeze_body = True
    work = tmp_path / "work"
    exp = experiment.build(config, str(work))
    params = exp.init_state(jax.random.key(1))[0].params
    updates, _ = exp.tx.update(jax.tree.map(jnp.ones_like, params), exp.tx.init(params), params)
    moved = {n: bool(np.any(np.asarray(u) != 0)) for n, u in _flat_names(updates).items()}
    want = {n: n.split("/")[0] in classification.HEAD_PARAMS or n in lacking for n in moved}
    assert moved == want
    assert (
        sorted(n for n in json.load(open(work / "init_from.new_params.json")) if "token_types" in n)
        == lacking
    )


def test_init_from_a_run_whose_layers_are_laid_out_otherwise_is_an_error():
    """Unrolled layers (layer_0, ...) cannot fill a scanned stack (layers): loading nothing is refused."""
    from flaxformer_lite.train import init_from

    loaded = {"decoder": {"layer_0": {"w": np.ones((2, 2))}}, "token_embed": {"embedding": np.ones((5, 2))}}
    fresh = {
        "decoder": {"layers": {"w": np.zeros((1, 2, 2))}},
        "token_embed": {"embedding": np.zeros((5, 2))},
    }
    fresh["classifier"] = {"kernel": np.zeros((2, 2))}
    with pytest.raises(ValueError, match="do not line up .*the same scan_layers"):
        init_from.merge(loaded, fresh, "runs/pretrained")
    params, new = init_from.merge(
        {k: v for k, v in loaded.items() if k != "decoder"}, {**fresh, "decoder": {}}, "x"
    )
    assert new == ["classifier/kernel"] and np.all(params["token_embed"]["embedding"] == 1)
