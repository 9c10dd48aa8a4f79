"""Minimum risk training (flaxformer_lite.train.mrt): its BLEU against sacrebleu, its gradient against
finite differences, one step moving probability towards the better candidate, and a real run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
from flax import linen as nn

import flaxformer_lite as fl
from flaxformer_lite import tasks
from flaxformer_lite.ids import EOS_ID
from flaxformer_lite.train import mrt


def _ids(rows, length):
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def test_sentence_bleu_equals_sacrebleu_on_ids():
    rng = np.random.default_rng(0)
    hyps, refs = [], []
    for _ in range(40):  # small alphabets: repeated n-grams, partial and zero matches
        ref = rng.integers(2, 7, size=rng.integers(1, 14)).tolist()
        hyp = rng.integers(2, 7, size=rng.integers(0, 14)).tolist()
        hyps.append(hyp + [EOS_ID, 5, 5])  # tokens after EOS are not part of the text
        refs.append(ref + [EOS_ID])
    hyps += [[3, 4, 5, 6, EOS_ID], [EOS_ID]]
    refs += [[3, 4, 5, 6, EOS_ID], [3, 4, EOS_ID]]
    got = np.asarray(mrt.sentence_bleu(jnp.asarray(_ids(hyps, 18)), jnp.asarray(_ids(refs, 16))))
    for g, h, r in zip(got, hyps, refs, strict=True):
        text = lambda ids: " ".join(map(str, ids[: ids.index(EOS_ID)]))  # noqa: E731
        want = sacrebleu.sentence_bleu(text(h), [text(r)], tokenize="none").score
        assert g == pytest.approx(want, abs=1e-3), (h, r)


def _tiny():
    cfg = fl.tiny(vocab_size=23, position="sinusoidal", max_len=16, activation="gelu")  # smooth, no kinks
    model = fl.EncoderDecoder(cfg)
    src = np.array([[5, 6, 7, EOS_ID, 0, 0], [8, 9, EOS_ID, 0, 0, 0]], np.int32)
    params = nn.unbox(model.init(jax.random.key(0), src, src)["params"])
    seg = (src > 0).astype(np.int32)
    batch = {"inputs": src, "inputs_segment_ids": seg, "inputs_positions": np.arange(6)[None] * seg,
             "targets_segment_ids": np.ones((2, 8), np.int32)}  # fmt: skip
    cands = jnp.asarray(np.stack([_ids([[3, 4, EOS_ID], [3, 9, 9, EOS_ID], [4, EOS_ID]], 8),
                                  _ids([[7, EOS_ID], [7, 7, EOS_ID], [2, 3, 4, EOS_ID]], 8)]))  # fmt: skip
    rewards = jnp.array([[0.9, 0.2, 0.4], [0.1, 0.8, 0.3]])
    return model, params, batch, cands, rewards


def test_risk_gradient_matches_finite_differences():
    model, params, batch, cands, rewards = _tiny()

    def risk(p):
        key = jax.random.key(0)
        total, n = mrt.risk_sums(
            p, batch, cands, rewards, key, model=model, task=tasks.TRANSLATION, alpha=0.5
        )
        return total / n

    risk = jax.jit(risk)  # compiled once: the finite differences call it twice more
    grads = jax.jit(jax.grad(risk))(params)
    direction = jax.tree.map(
        lambda g: np.random.default_rng(1).standard_normal(g.shape).astype(np.float32), grads
    )
    eps = 1e-3  # central differences converge to 1e-4 here (float32, smooth GELU model)
    plus = risk(jax.tree.map(lambda p, d: p + eps * d, params, direction))
    minus = risk(jax.tree.map(lambda p, d: p - eps * d, params, direction))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(
        jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
    )
    assert float(analytic) == pytest.approx(float(numeric), rel=2e-2, abs=1e-5)
    assert abs(float(numeric)) > 1e-4  # a real slope, not two zeros


@pytest.mark.slow  # 30-130 s on 2 cores: the slow tier (CI runs it)
def test_one_step_raises_the_probability_of_the_better_candidate():
    model, params, batch, cands, rewards = _tiny()
    key = jax.random.key(0)

    def q(p):  # the candidates' distribution, from the plain forward
        tgt = cands.reshape(6, 8)
        dec_in = jnp.concatenate([jnp.zeros((6, 1), jnp.int32), tgt[:, :-1]], axis=1)
        logp = jax.nn.log_softmax(model.apply({"params": p}, batch["inputs"].repeat(3, 0), dec_in), -1)
        lp = (jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0] * (tgt > 0)).sum(-1).reshape(2, 3)
        return jax.nn.softmax(0.5 * lp, -1)

    def risk(p):
        total, n = mrt.risk_sums(
            p, batch, cands, rewards, key, model=model, task=tasks.TRANSLATION, alpha=0.5
        )
        return total / n

    before = q(params)
    params = jax.tree.map(lambda p, g: p - 0.5 * g, params, jax.grad(risk)(params))
    after = q(params)
    best = np.argmax(np.asarray(rewards), axis=1)
    for b in range(2):
        assert float(after[b, best[b]]) > float(before[b, best[b]])
    assert float(risk(params)) < float(jnp.sum(before * (1 - rewards), -1).mean())


def test_duplicate_candidates_count_once():
    same = jnp.asarray(np.array([[[3, 1, 0], [3, 1, 0], [4, 1, 0]]], np.int32))
    assert np.asarray(mrt._distinct(same)).tolist() == [[True, False, True]]


@pytest.mark.slow
def test_mrt_fine_tunes_a_trained_run_and_logs_reward_and_risk(reference, prepared, tmp_path):
    from tests import runs

    workdir = str(tmp_path / "mrt")
    runs.run(workdir, prepared, f"--config.init_from={reference}", "--config.objective=mrt",
             "--config.num_train_steps=4", "--config.log_every=1", "--config.mrt_candidates=2")  # fmt: skip
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 4 and all(0 <= r["mrt_reward"] <= 1 and 0 <= r["mrt_risk"] <= 1 for r in train)
    assert all(np.isfinite(r["loss"]) for r in train)
