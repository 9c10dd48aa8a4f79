"""Decoder outputs: n-best with scores, ensembles, forced prefixes and cross-attention weights.

References are independent of the cached decoders: the uncached model's full forward pass
(log-softmax in numpy), exhaustive search over a hand-built table language, numpy averages, and
a model whose cross-attention is set by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flaxformer_lite as fl
from flaxformer_lite import decoding
from flaxformer_lite.ids import EOS_ID, PAD_ID
from tests.test_decoding import A, C, _brute_force_best, _garden_path_table, _table_step_fn

TOL = 2e-4  # float32 log-probs summed over <= 12 tokens; cached and uncached attention differ in order


def _tiny(scan=False, vocab=31, **kw):
    cfg = fl.tiny(vocab_size=vocab, position="sinusoidal", scan_layers=scan, max_len=64, **kw)
    model = fl.EncoderDecoder(cfg)
    src = jax.random.randint(jax.random.key(3), (2, 6), 2, vocab).at[1, 4:].set(0)
    params = nn.unbox(model.init(jax.random.key(0), src, src)["params"])
    return model, params, src


def _log_p(model, params, src_row, hyp) -> np.ndarray:
    """Per-token log P of `hyp` (ids up to EOS) given one source, from the uncached full forward."""
    dec_in = np.zeros((1, len(hyp)), np.int32)
    dec_in[0, 1:] = hyp[:-1]
    logits = model.apply({"params": params}, src_row[None], jnp.asarray(dec_in))[0]
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return np.asarray(logp)[np.arange(len(hyp)), hyp]


def _hyp(tokens) -> list[int]:
    row = [int(t) for t in tokens]
    return row[: row.index(EOS_ID) + 1] if EOS_ID in row else [t for t in row if t != PAD_ID]


@pytest.mark.parametrize("scan", [False, True])
def test_nbest_log_probs_equal_the_uncached_model_and_best_equals_beam(scan):
    model, params, src = _tiny(scan)
    decode = jax.jit(lambda p, x: decoding.translate_outputs(model, p, x, 12, beams=4, alpha=0.6))
    out = jax.device_get(decode(params, src))
    best = jax.jit(lambda p, x: decoding.translate_beam(model, p, x, 12, beams=4, alpha=0.6))(params, src)
    np.testing.assert_array_equal(out["tokens"][:, 0], best)  # the 1-best is today's beam output
    for b in range(2):
        assert np.all(np.diff(out["scores"][b]) <= 0)  # best first
        for k in range(4):
            hyp = _hyp(out["tokens"][b, k])
            ref = _log_p(model, params, src[b], hyp)
            np.testing.assert_allclose(out["token_logp"][b, k, : len(hyp)], ref, atol=TOL)
            assert out["logp"][b, k] == pytest.approx(ref.sum(), abs=TOL * len(hyp))
            lp = ((5 + len(hyp)) / 6) ** 0.6
            assert out["scores"][b, k] == pytest.approx(ref.sum() / lp, abs=TOL * len(hyp))


def test_greedy_outputs_score_the_greedy_hypothesis():
    model, params, src = _tiny()
    out = jax.device_get(jax.jit(lambda p, x: decoding.translate_outputs(model, p, x, 10))(params, src))
    for b in range(2):
        hyp = _hyp(out["tokens"][b, 0])
        np.testing.assert_allclose(
            out["token_logp"][b, 0, : len(hyp)], _log_p(model, params, src[b], hyp), atol=TOL
        )


def test_sampling_options_with_beam_search_are_an_error_not_ignored():
    """Beam search is deterministic: a temperature or top_p given with beams > 1 did nothing, silently."""
    model, params, src = _tiny()
    with pytest.raises(
        ValueError, match=r"sampling options \(rng, temperature\) with beam search \(3 beams\)"
    ):
        decoding.translate_outputs(model, params, src, 10, beams=3, temperature=0.7, rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"sampling options \(top_p\) with beam search"):
        decoding.translate_outputs(model, params, src, 10, search="beam", top_p=0.9)


def test_ensemble_of_a_model_with_itself_equals_the_model():
    model, params, src = _tiny()
    one = jax.jit(lambda p, x: decoding.translate_outputs(model, p, x, 10, beams=3))(params, src)
    two = jax.jit(lambda p, x: decoding.translate_outputs([model, model], [p, p], x, 10, beams=3))(
        params, src
    )
    np.testing.assert_array_equal(one["tokens"], two["tokens"])
    np.testing.assert_allclose(one["scores"], two["scores"], atol=1e-5)


@pytest.mark.parametrize("mode", ["log", "prob"])
def test_ensemble_step_averages_the_models_distributions(mode):
    """Two models of different sizes: the step's log-probs are numpy's average of theirs."""
    small, p_small, src = _tiny()
    big_cfg = small.config.replace(d_model=48, num_heads=2, d_ff=96, num_decoder_layers=2)
    big = fl.EncoderDecoder(big_cfg)
    p_big = nn.unbox(big.init(jax.random.key(7), src, src)["params"])

    @jax.jit
    def step(ps, pb, x, tokens):
        fns = [decoding.translation_step_fn(m, p, x, 4) for m, p in ((small, ps), (big, pb))]
        ens = decoding.ensemble_step_fn([f for f, _ in fns], mode)
        return ens(tokens, tuple(c for _, c in fns))[0], [f(tokens, c)[0] for f, c in fns]

    got, (l1, l2) = step(p_small, p_big, src, jnp.zeros((2, 1), jnp.int32))
    lp1 = jax.nn.log_softmax(np.asarray(l1, np.float64))
    lp2 = jax.nn.log_softmax(np.asarray(l2, np.float64))
    want = (lp1 + lp2) / 2 if mode == "log" else np.log((np.exp(lp1) + np.exp(lp2)) / 2)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_forced_prefix_is_kept_and_greedy_continues_from_it():
    model, params, src = _tiny()
    prefix = np.array([[7, 9, 4], [5, 0, 0]], np.int32)  # per-row lengths 3 and 1
    forced = np.zeros((2, 10), np.int32)
    forced[:, :3] = prefix
    out = jax.jit(lambda p, x, f: decoding.translate_outputs(model, p, x, 10, forced=f))(params, src, forced)
    forward = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y))
    for b, n in ((0, 3), (1, 1)):
        got = [int(t) for t in out["tokens"][b, 0]]
        assert got[:n] == prefix[b, :n].tolist()  # verbatim
        seq = [0] + prefix[b, :n].tolist()  # the reference: argmax of the uncached model, from the prefix
        while len(seq) <= 10 and seq[-1] != EOS_ID:
            logits = forward(params, src[b : b + 1], jnp.asarray([seq]))
            seq.append(int(np.argmax(logits[0, -1])))
        assert _hyp(got) == seq[1:11]
        scored = _log_p(model, params, src[b], _hyp(got))
        np.testing.assert_allclose(out["token_logp"][b, 0, :n], scored[:n], atol=TOL)  # the prefix is scored


def test_forced_prefix_beam_finds_the_best_sequence_with_that_prefix():
    table = _garden_path_table()
    step_fn = _table_step_fn(table)
    forced = jnp.array([[A, 0, 0, 0, 0, 0]], jnp.int32)
    out = decoding.beam_search_outputs(step_fn, None, 1, 3, 6, alpha=0.0, forced=forced)
    # Unforced, the best is B EOS (0.4); after A: A C EOS (0.21), then A EOS (0.18).
    assert out["tokens"][0, 0, :3].tolist() == [A, C, EOS_ID]
    t = table.copy()
    t[0] = 0
    t[0, A] = 1.0  # a language that must start with A, scored as the original
    want = _brute_force_best(t, 6, 0.0) + np.log(0.6)
    assert float(out["scores"][0, 0]) == pytest.approx(want, abs=1e-5)
    assert bool(out["valid"][0, 0]) and all(
        int(out["tokens"][0, k, 0]) == A for k in range(3) if out["valid"][0, k]
    )
    assert out["tokens"][0, 1].tolist()[:2] == [A, EOS_ID]


def _hand_set_alignment_model(reverse: bool):
    """A model whose cross-attention from target position t goes to source position t (or n-1-t).

    Token embeddings are 0 and the learned positions one-hot, so after LayerNorm a query or key
    is its position's one-hot (shifted); query = 40 * x, key = x (or its position reversed).
    The decoder's self-attention output is zeroed, so the query is the position alone.
    """
    D, n = 16, 6
    cfg = fl.tiny(
        vocab_size=20, d_model=D, num_heads=2, head_dim=D, d_ff=8, num_encoder_layers=0, num_decoder_layers=1,
        position="learned", max_len=D, pre_norm=True,
    )  # fmt: skip
    model = fl.EncoderDecoder(cfg)
    src = jnp.arange(2, 2 + n, dtype=jnp.int32)[None]
    params = jax.tree.map(np.array, nn.unbox(model.init(jax.random.key(0), src, src)["params"]))
    params["token_embed"]["embedding"][:] = 0
    eye = np.eye(D, dtype=np.float32)
    for stack in ("encoder", "decoder"):
        params[stack]["positions"]["table"]["embedding"][:] = 3 * eye
    layer = params["decoder"]["layer_0"]
    layer["self_attention"]["out"]["kernel"][:] = 0
    perm = eye[:, (n - 1 - np.arange(D)) % D if reverse else np.arange(D)]
    xattn = layer["cross_attention"]
    xattn["query"]["kernel"][:] = 40 * eye[:, None, :]
    xattn["key"]["kernel"][:] = perm[:, None, :]
    for name in ("query", "key"):
        xattn[name]["bias"][:] = 0
    return model, params, src, n


@pytest.mark.parametrize("reverse", [False, True])
def test_alignment_of_a_hand_set_model_is_the_identity_or_the_reversal(reverse, tmp_path):
    from flaxformer_lite.generation import formatting

    model, params, src, n = _hand_set_alignment_model(reverse)
    src = jnp.concatenate([src, jnp.array([[EOS_ID]])], axis=1)  # n real tokens, then EOS
    forced = jnp.array([[3, 4, 5, 6, 7, EOS_ID]], jnp.int32)  # every target token forced
    spec = decoding.Attention(layer=None)
    out = jax.jit(
        lambda p, x, f: decoding.translate_outputs(model, p, x, 6, beams=2, forced=f, attention=spec)
    )(params, src, forced)
    weights = np.asarray(out["attention"][0, 0, :, -1])  # [L, S] of the last (only) layer
    pairs = formatting.pharaoh(weights, source_len=n, target_len=5)
    t = np.arange(5)
    want = " ".join(f"{s}-{i}" for i, s in zip(t, (n - 1 - t) if reverse else t, strict=True))
    assert pairs == want
    png = tmp_path / "attention.png"
    weights = np.asarray(out["attention"][0, 0, :5, :, : n + 1])
    formatting.plot_attention(str(png), weights, list("abcdef") + ["</s>"], list("vwxyz"), dpi=50, cell=0.4)
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    w, h = formatting.figure_size(layers=1, source_len=n + 1, target_len=5, cell=0.4)
    assert image.shape[:2] == (round(h * 50), round(w * 50))


def test_attention_carried_through_the_beam_equals_forcing_each_hypothesis():
    """Beam reorders move each hypothesis's attention with it: forcing the hypothesis alone gives
    the same weights."""
    model, params, src = _tiny(num_decoder_layers=2)
    spec = decoding.Attention(layer=None, head=1)
    out = jax.jit(lambda p, x: decoding.translate_outputs(model, p, x, 8, beams=3, attention=spec))(
        params, src
    )
    force = jax.jit(lambda p, x, f: decoding.translate_outputs(model, p, x, 8, forced=f, attention=spec))
    for k in range(3):
        forced = np.where(np.asarray(out["tokens"][:, k]) == PAD_ID, 0, np.asarray(out["tokens"][:, k]))
        alone = force(params, src, forced)
        for b in range(2):
            n = len(_hyp(out["tokens"][b, k]))
            np.testing.assert_allclose(out["attention"][b, k, :n], alone["attention"][b, 0, :n], atol=1e-5)
        assert np.all(np.asarray(out["attention"][1, k, :, :, 4:]) < 1e-6)  # never on the source's padding


# ------------------------------------------------------------------------------ the CLIs


def _generate(workdir, prepared, *flags, stdin: bytes):
    from tests import runs

    proc = runs.script(
        "generate.py", f"--workdir={workdir}", f"--config.data_dir={prepared[0]}", *flags, stdin=stdin
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.decode().splitlines()


@pytest.mark.slow
def test_generate_prints_nbest_json_alignments_a_prefix_and_an_attention_map(reference, prepared, tmp_path):
    import json

    import matplotlib.image

    png = tmp_path / "map.png"
    lines = b"God said.\tGott\nJesus wept.\t\n"
    flags = ("--beam_size=3", "--nbest=2", "--output_format=json", "--prefix", "--alignment")
    rows = [
        json.loads(x) for x in _generate(reference, prepared, *flags, f"--plot_attention={png}", stdin=lines)
    ]
    assert [r["source"] for r in rows] == ["God said.\tGott", "Jesus wept.\t"]
    for r in rows:
        assert 1 <= len(r["nbest"]) <= 2 and r["nbest"][0]["score"] >= r["nbest"][-1]["score"]
        for h in r["nbest"]:
            assert len(h["token_logp"]) == h["tokens"] + 1 and h["logp"] == pytest.approx(
                sum(h["token_logp"]), abs=1e-2
            )
            pairs = [p.split("-") for p in h["alignment"].split()]
            assert [int(t) for _, t in pairs] == list(range(h["tokens"]))  # one source piece per target piece
    assert all(h["text"].startswith("Gott") for h in rows[0]["nbest"])  # the prefix, verbatim
    assert matplotlib.image.imread(str(png)).shape[0] > 50
    # An ensemble of the model with itself prints the same hypotheses.
    same = [
        json.loads(x) for x in _generate(reference, prepared, *flags, f"--ensemble={reference}", stdin=lines)
    ]
    assert [[h["text"] for h in r["nbest"]] for r in same] == [[h["text"] for h in r["nbest"]] for r in rows]


@pytest.mark.slow
def test_an_ensemble_member_with_another_vocabulary_is_a_one_line_error(reference, prepared, tmp_path):
    from tests import runs

    other = tmp_path / "other"
    other.mkdir()
    (other / "spm.model").write_bytes(b"another tokenizer")
    proc = runs.script("generate.py", f"--workdir={reference}", f"--config.data_dir={prepared[0]}",
                       f"--ensemble={other}", stdin=b"God said.\n")  # fmt: skip
    err = proc.stderr.decode().strip().splitlines()
    assert (
        proc.returncode == 1
        and err[-1].startswith("error: ensemble member")
        and "another vocabulary" in err[-1]
    )


@pytest.mark.slow
def test_eval_of_an_ensemble_of_a_model_with_itself_scores_as_the_model(reference, prepared, tmp_path):
    import json

    from tests import runs

    summaries = []
    for extra in ((), (f"--ensemble={reference}",)):
        out = tmp_path / f"eval{len(extra)}"
        flags = ("--beam_size=2", "--max_examples=6", f"--output_dir={out}", *extra)
        proc = runs.script("eval.py", f"--workdir={reference}", f"--config.data_dir={prepared[0]}", *flags)
        assert proc.returncode == 0, proc.stderr[-2000:]
        summaries.append(json.load(open(next(out.glob("*.json")))))
    assert summaries[1]["ensemble"] == [reference, reference] and "ensemble" not in summaries[0]
    assert (
        summaries[1]["bleu"] == pytest.approx(summaries[0]["bleu"])
        and summaries[1]["chrf"] == summaries[0]["chrf"]
    )


def test_a_short_forced_prefix_frees_the_steps_after_it_and_junk_beams_are_not_valid():
    step_fn = _table_step_fn(_garden_path_table())
    forced = jnp.array([[A]], jnp.int32)  # one position, for a 6-step loop
    greedy = decoding.sample_outputs(step_fn, None, jnp.zeros((1,), jnp.int32), 6, forced=forced)
    assert greedy["tokens"][0].tolist()[:3] == [A, C, EOS_ID]  # free after A: C, then EOS (ties C)
    beam = decoding.beam_search_outputs(step_fn, None, 1, 3, 6, alpha=0.6, forced=forced)
    assert beam["tokens"][0, 0].tolist()[:3] == [A, C, EOS_ID]
    # Every valid slot is a real hypothesis (finite log P under the table).
    table = _garden_path_table()
    for k in range(3):
        if beam["valid"][0, k]:
            hyp = _hyp(beam["tokens"][0, k])
            prev, logp = 0, 0.0
            for t in hyp:
                logp += np.log(table[prev, t])
                prev = t
            assert np.isfinite(logp)
    full = jnp.full((1, 6), C, jnp.int32)  # forced through the limit: no real hypothesis ends
    out = decoding.beam_search_outputs(step_fn, None, 1, 3, 6, alpha=0.6, forced=full.at[0, 0].set(A))
    assert not bool(np.asarray(out["valid"])[0, 1:].any())
