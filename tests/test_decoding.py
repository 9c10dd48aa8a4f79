import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flaxformer_lite as fl
from flaxformer_lite import decoding
from flaxformer_lite.data.tokenizer import EOS_ID
from flaxformer_lite.decoding import sampling

A, B_, C = 3, 4, 5  # token ids of a hand-built language (0 pad, 1 eos)


def _table_step_fn(table):
    """step_fn from a table: next-token log-probs depend only on the previous token."""
    table = jnp.log(jnp.asarray(table, jnp.float32) + 1e-12)

    def step_fn(tokens, cache):
        return table[tokens[:, 0]], cache

    return step_fn


def _garden_path_table():
    # From start (0): A 0.6, B 0.4. After A: EOS 0.3, C 0.7 then C -> C ... (long and unlikely to end).
    # After B: EOS 1.0. Greedy takes A; the best sequence is B EOS (0.4 vs at most 0.6 * 0.3 = 0.18).
    t = np.zeros((6, 6))
    t[0, A], t[0, B_] = 0.6, 0.4
    t[A, EOS_ID], t[A, C] = 0.3, 0.7
    t[B_, EOS_ID] = 1.0
    t[C, C], t[C, EOS_ID] = 0.5, 0.5
    t[EOS_ID, EOS_ID] = 1.0
    return t


def test_beam_search_finds_the_best_sequence_greedy_misses():
    step_fn = _table_step_fn(_garden_path_table())
    greedy = decoding.sample(step_fn, None, jnp.zeros((1,), jnp.int32), 6)
    assert greedy[0, :2].tolist() == [A, C]
    seqs, scores = decoding.beam_search(step_fn, None, 1, 3, 6, alpha=0.0)
    assert seqs[0, 0, :2].tolist() == [B_, EOS_ID]
    assert float(scores[0, 0]) == pytest.approx(np.log(0.4), abs=1e-5)
    assert float(scores[0, 1]) == pytest.approx(np.log(0.6 * 0.7 * 0.5), abs=1e-5)  # A C EOS is second
    assert np.all(np.diff(np.asarray(scores[0])) <= 0)  # sorted best first


def _brute_force_best(table, max_len, alpha):
    """Best log P / lp(length) over every sequence ending in EOS within max_len (exhaustive)."""
    best = -np.inf

    def walk(prev, logp, length):
        nonlocal best
        for tok in range(1, table.shape[1]):
            p = table[prev, tok]
            if p == 0:
                continue
            if tok == EOS_ID:
                best = max(best, (logp + np.log(p)) / ((5 + length + 1) / 6) ** alpha)
            elif length + 1 < max_len:
                walk(tok, logp + np.log(p), length + 1)

    walk(0, 0.0, 0)
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.6, 3.0])
def test_beam_search_matches_exhaustive_search(alpha):
    table = _garden_path_table()
    table[A] = [0, 0.2, 0, 0, 0.3, 0.5]  # more branching so the length penalty matters
    table[C] = [0, 0.4, 0, 0.3, 0, 0.3]
    seqs, scores = decoding.beam_search(_table_step_fn(table), None, 1, 8, 6, alpha=alpha)
    assert float(scores[0, 0]) == pytest.approx(_brute_force_best(table, 6, alpha), abs=1e-4)


def test_max_lengths_force_eos():
    table = _garden_path_table()
    table[0] = [0, 0, 0, 1.0, 0, 0]
    table[A] = [0, 0, 0, 0, 0, 1.0]  # A -> C -> C ... never EOS unless forced
    table[C] = [0, 0, 0, 0, 0, 1.0]
    seqs, _ = decoding.beam_search(_table_step_fn(table), None, 2, 2, 8, max_lengths=jnp.array([3, 5]))
    assert seqs[0, 0].tolist()[:3] == [A, C, EOS_ID]
    assert seqs[1, 0].tolist()[:5] == [A, C, C, C, EOS_ID]


def _tiny_translation():
    cfg = fl.tiny(vocab_size=31, position="sinusoidal", max_len=64)
    model = fl.EncoderDecoder(cfg)
    src = jax.random.randint(jax.random.key(1), (3, 6), 2, 31).at[2, 4:].set(0)
    params = nn.unbox(model.init(jax.random.key(0), src, src)["params"])
    return model, params, src


def test_beam_one_equals_greedy_and_top_k_one_equals_greedy():
    model, params, src = _tiny_translation()
    greedy = jax.jit(lambda p, x: decoding.translate(model, p, x, 7))(params, src)
    beam1 = jax.jit(lambda p, x: decoding.translate_beam(model, p, x, 7, beams=1, alpha=0.0))(params, src)
    topk1 = jax.jit(
        lambda p, x: decoding.translate(model, p, x, 7, temperature=1.0, top_k=1, rng=jax.random.key(5))
    )(params, src)
    # Beam search ends every hypothesis with EOS by max_len; greedy simply stops there.
    np.testing.assert_array_equal(beam1[:, :-1], greedy[:, :-1])
    np.testing.assert_array_equal(topk1, greedy)


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(sampling._filter_logits(logits, 0, 0.7))) & (
        np.asarray(sampling._filter_logits(logits, 0, 0.7)) > -1e30
    )
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 >= 0.7
    kept = np.asarray(sampling._filter_logits(logits, 2, 1.0)) > -1e30
    assert kept.tolist() == [[True, True, False, False]]
    draws = jax.vmap(lambda k: jax.random.categorical(k, sampling._filter_logits(logits, 0, 0.7))[0])(
        jax.random.split(jax.random.key(0), 4000)
    )
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)  # renormalised 0.5/0.8, 0.3/0.8


@pytest.mark.parametrize("steps", [6, decoding.STAGED_STEPS])  # the second in stages, after a prompt
def test_cached_lm_generation_equals_recomputing_the_full_forward(steps):
    cfg = fl.tiny(vocab_size=31, position="rope", pre_norm=True, max_len=48)
    model = fl.DecoderOnly(cfg)
    prompt = jax.random.randint(jax.random.key(2), (2, 4), 2, 31)
    params = nn.unbox(model.init(jax.random.key(0), prompt)["params"])
    got = jax.jit(lambda p, x: decoding.lm_generate(model, p, x, steps, eos_id=-1))(params, prompt)
    full = fl.DecoderOnly(cfg.replace(deterministic=True))
    forward = jax.jit(lambda p, x: full.apply({"params": p}, x))  # one shape: compiled once
    # No cache: run the whole sequence again for every new token. Row = [0, prompt, new..., 0 pad];
    # causal attention keeps the trailing pad from changing earlier positions.
    seq = np.zeros((2, 1 + 4 + steps), np.int32)
    seq[:, 1:5] = np.asarray(prompt)
    for i in range(steps):
        logits = forward(params, jnp.asarray(seq))
        seq[:, 5 + i] = np.argmax(logits[:, 4 + i], -1)  # position 4 + i predicts token 5 + i
    np.testing.assert_array_equal(got, seq[:, 5:])


@pytest.mark.parametrize("steps", [6, decoding.STAGED_STEPS])  # the second in stages
def test_cached_translation_equals_recomputing_the_full_forward(steps):
    model, params, src = _tiny_translation()
    got = jax.jit(lambda p, x: decoding.translate(model, p, x, steps, eos_id=-1))(params, src)
    forward = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y))  # one shape: compiled once
    dec_in = np.zeros((3, steps + 1), np.int32)  # [0, new tokens..., 0 pad]: causal, the pad changes nothing
    for i in range(steps):
        logits = forward(params, src, jnp.asarray(dec_in))
        dec_in[:, i + 1] = np.argmax(logits[:, i], -1)
    np.testing.assert_array_equal(got, dec_in[:, 1:])


@pytest.mark.parametrize(
    "scan, batch, length",
    [(False, 3, 6), (True, 1, 6), (False, 2, decoding.STAGED_STEPS + 8)],
)  # scan: 2 layers = batch x beams; the last runs in stages over a growing cache
def test_beam_scores_equal_full_forward_log_probs(scan, batch, length):
    """Every returned hypothesis scores the log P the uncached model gives it (alpha 0).

    A self-attention cache reordered or resized wrongly, or a beam reading another source's
    cross-attention row, changes the scores. With scan_layers the layer axis (2) equals
    batch * beams (2). The long case makes EOS unlikely so that every stage runs.
    """
    cfg = fl.tiny(vocab_size=31, position="sinusoidal", scan_layers=scan, logits_bias=True, max_len=64)
    model = fl.EncoderDecoder(cfg)
    src = jax.random.randint(jax.random.key(3), (batch, 6), 2, 31)
    if batch > 1:
        src = src.at[1, 3:].set(0)
    params = nn.unbox(model.init(jax.random.key(0), src, src)["params"])
    if length > 6:
        params["decoder"]["logits_bias"] = params["decoder"]["logits_bias"].at[EOS_ID].set(-30.0)

    @jax.jit
    def search(params, src):
        step_fn, cache = decoding.translation_step_fn(model, params, src, length, beams=2)
        return decoding.beam_search(step_fn, cache, batch, 2, length, alpha=0.0)

    seqs, scores = search(params, src)
    forward = jax.jit(lambda x, y: jax.nn.log_softmax(model.apply({"params": params}, x, y)))
    for b in range(batch):
        for k in range(2):
            seq = np.asarray(seqs[b, k])
            n = list(seq).index(EOS_ID) + 1  # the limit forces EOS by the last step
            if length > 6:
                assert n == length
            dec_in = np.concatenate([[0], seq[:-1]])[None]
            logp = np.asarray(forward(src[b : b + 1], jnp.asarray(dec_in)))[0]
            want = sum(logp[t, seq[t]] for t in range(n))
            np.testing.assert_allclose(scores[b, k], want, rtol=1e-5, atol=1e-4)
