"""Sequence-level training against the metric: minimum risk training (Shen et al. 2016).

For each source the current model draws K candidates (sampled with a temperature, or the beam's
K best), each is scored against the reference with smoothed sentence BLEU, and the loss is the
risk  sum_k q(y_k|x) (1 - BLEU_k / 100)  with q the model's distribution renormalised over the
distinct candidates and sharpened by alpha: q = softmax(alpha * log P(y_k|x)). Optionally mixed
with the token-level loss (`mix`, as Edunov et al. 2018 recommend). Candidates are decoded with
the KV-cache decoders inside the jitted train step; the risk's forward is the ordinary
teacher-forced forward over the candidates. BLEU is computed on SentencePiece ids in the step
(jittable, no host round trip); `sentence_bleu` equals sacrebleu's sentence BLEU (exp smoothing,
effective order) over the same ids written as tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxformer_lite import decoding, ops
from flaxformer_lite.cli import need
from flaxformer_lite.ids import EOS_ID, PAD_ID

MAX_ORDER = 4
OBJECTIVES = ("mle", "mrt")


def check_config(config, task) -> None:
    """The `objective` and `mrt_*` fields (configs/default.py): one-line errors naming the fix."""
    need(config.objective in OBJECTIVES, f"objective={config.objective!r}; use one of {OBJECTIVES}")
    if config.objective != "mrt":
        return
    need(task.translates, f"objective=mrt trains translation models, not task={task.name!r}")
    need(not config.pack, "objective=mrt needs pack=False (a row per sentence, for its candidates)")
    need(config.mrt_candidates >= 2, f"mrt_candidates={config.mrt_candidates} must be >= 2")
    need(config.mrt_source in ("sample", "beam"), f"mrt_source={config.mrt_source!r}; use sample or beam")
    need(config.mrt_temperature > 0, f"mrt_temperature={config.mrt_temperature} must be > 0")
    need(config.mrt_alpha > 0, f"mrt_alpha={config.mrt_alpha} must be > 0")
    need(config.mrt_mix >= 0, f"mrt_mix={config.mrt_mix} must be >= 0")
    need(config.scheduled_sampling_max_prob == 0, "objective=mrt and scheduled sampling: use one of them")


def _clip_after_eos(ids):
    """[N, L] ids -> the same with EOS and everything after it set to PAD (the text's pieces only)."""
    seen = jnp.cumsum(ids == EOS_ID, axis=-1) > 0
    return jnp.where(seen, PAD_ID, ids)


def _windows(x, n: int):
    """[N, L] ids -> ([N, L - n + 1, n] n-grams, [N, L - n + 1] whether each is PAD-free)."""
    grams = x.shape[1] - n + 1
    w = jnp.stack([x[:, i : i + grams] for i in range(n)], axis=-1)
    return w, jnp.all(w != PAD_ID, -1)


def _ngram_matches(hyp, ref, n: int):
    """(clipped n-gram matches, hypothesis n-grams) per row of [N, L] ids (PAD-free prefixes)."""
    if n > hyp.shape[1]:
        z = jnp.zeros(hyp.shape[:1], jnp.float32)
        return z, z
    h, h_ok = _windows(hyp, n)
    in_hyp = (jnp.all(h[:, :, None] == h[:, None], -1) & h_ok[:, None, :]).sum(-1).astype(jnp.float32)
    in_ref = jnp.zeros_like(in_hyp)
    if n <= ref.shape[1]:
        r, r_ok = _windows(ref, n)
        in_ref = (jnp.all(h[:, :, None] == r[:, None], -1) & r_ok[:, None, :]).sum(-1).astype(jnp.float32)
    # Each of an n-gram's c occurrences in the hypothesis adds min(c, r) / c: min(c, r) in all.
    clipped = jnp.where(h_ok, jnp.minimum(in_hyp, in_ref) / jnp.maximum(in_hyp, 1.0), 0.0)
    return clipped.sum(-1), h_ok.sum(-1).astype(jnp.float32)


def sentence_bleu(hyp, ref):
    """Smoothed sentence BLEU in [0, 100] of [N, L] hypothesis ids against [N, L'] reference ids
    (each up to its EOS): sacrebleu's `sentence_bleu` (exp smoothing, effective order) with ids as
    tokens."""
    hyp, ref = _clip_after_eos(hyp), _clip_after_eos(ref)
    hyp_len = jnp.sum(hyp != PAD_ID, -1).astype(jnp.float32)
    ref_len = jnp.sum(ref != PAD_ID, -1).astype(jnp.float32)
    log_p, zero_orders = jnp.zeros_like(hyp_len), jnp.zeros_like(hyp_len)
    order = jnp.zeros_like(hyp_len)  # the effective order: orders with any hypothesis n-gram
    matched = jnp.zeros_like(hyp_len)
    for n in range(1, MAX_ORDER + 1):
        correct, total = _ngram_matches(hyp, ref, n)
        matched = matched + correct
        has = total > 0
        zero_orders = zero_orders + (has & (correct == 0))
        p = jnp.where(
            correct > 0, correct / jnp.maximum(total, 1.0), 1.0 / (2.0**zero_orders * jnp.maximum(total, 1.0))
        )
        log_p = log_p + jnp.where(has, jnp.log(p), 0.0)
        order = order + has
    bp = jnp.where(hyp_len < ref_len, jnp.exp(1.0 - ref_len / jnp.maximum(hyp_len, 1.0)), 1.0)
    # No n-gram matched at all: 0 (sacrebleu stops early there, before smoothing).
    return jnp.where((order > 0) & (matched > 0), 100.0 * bp * jnp.exp(log_p / jnp.maximum(order, 1.0)), 0.0)


def candidates(model, params, batch, rng, *, k: int, source: str, temperature: float, max_len: int):
    """[B, K, max_len] candidate ids per source row (no gradient): sampled or the beam's K best."""
    params = jax.lax.stop_gradient(params)
    inputs = batch["inputs"]
    if source == "beam":
        return decoding.translate_outputs(model, params, inputs, max_len, beams=k, search="beam")["tokens"]
    B = inputs.shape[0]
    repeated = jnp.repeat(inputs, k, axis=0)  # [B*K, S], a source's candidates adjacent
    out = decoding.translate_outputs(model, params, repeated, max_len, temperature=temperature, rng=rng)
    return out["tokens"][:, 0].reshape(B, k, max_len)


def _distinct(cands):
    """[B, K] True for the first occurrence of each distinct candidate of a row."""
    same = jnp.all(cands[:, :, None] == cands[:, None], axis=-1)  # [B, K, K]
    earlier = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)[None]
    return ~jnp.any(same & earlier, axis=-1)


def risk_sums(params, batch, cands, rewards, rng, *, model, task, alpha: float):
    """(sum over sources of the risk, number of sources) for fixed candidates [B, K, L] and their
    rewards [B, K] in [0, 1]; the gradient flows through log P(candidate | source) only."""
    B, K, L = cands.shape
    segs = (cands != PAD_ID).astype(jnp.int32).reshape(B * K, L)
    cand_batch = {
        "inputs": jnp.repeat(batch["inputs"], K, axis=0),
        "inputs_segment_ids": jnp.repeat(batch["inputs_segment_ids"], K, axis=0),
        "inputs_positions": jnp.repeat(batch["inputs_positions"], K, axis=0),
        "targets": cands.reshape(B * K, L),
        "targets_segment_ids": segs,
        "targets_positions": jnp.broadcast_to(jnp.arange(L), (B * K, L)) * segs,
    }
    logits, targets, weights = task.forward(model, params, cand_batch, rng)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    seq_logp = (jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights).sum(-1).reshape(B, K)
    real = jnp.any(batch["targets_segment_ids"] > 0, axis=-1)  # rows holding a sentence
    keep = _distinct(cands) & (segs.reshape(B, K, L).sum(-1) > 0)
    q = jax.nn.softmax(jnp.where(keep, alpha * seq_logp, -1e9), axis=-1)
    risk = jnp.sum(q * (1.0 - rewards), axis=-1)
    return jnp.sum(jnp.where(real, risk, 0.0)), jnp.sum(real).astype(jnp.float32)


def loss_sums(params, batch, rng, *, model, task, label_smoothing=0.0, sampling_prob=None, options=None):
    """`training.loss_sums` for the MRT objective: (loss sum, (tokens, NLL sum, correct, extras)).

    The loss sum is mix * token loss + risk * tokens / sources, so the train step's division by
    the token count gives mix * (mean token loss) + (mean risk per source). extras: the mean
    reward (BLEU / 100) of the candidates and the mean risk, summed over micro-batches.
    """
    del sampling_prob
    o = options
    if "inputs" not in batch:
        raise ValueError("objective=mrt trains translation models (it scores candidates against references).")
    cand_rng, fwd_rng, tok_rng = jax.random.split(rng, 3)
    L = batch["targets"].shape[1]
    draw = dict(k=o["k"], source=o["source"], temperature=o["temperature"], max_len=L)
    cands = candidates(model, params, batch, cand_rng, **draw)
    B, K, _ = cands.shape
    refs = jnp.repeat(jnp.where(batch["targets_segment_ids"] > 0, batch["targets"], PAD_ID), K, axis=0)
    rewards = jax.lax.stop_gradient(sentence_bleu(cands.reshape(B * K, L), refs).reshape(B, K) / 100.0)
    risk, sources = risk_sums(
        params, batch, cands, rewards, fwd_rng, model=model, task=task, alpha=o["alpha"]
    )
    logits, targets, weights = task.forward(model, params, batch, tok_rng)
    token_loss, nll, correct, denom = ops.token_losses(logits, targets, weights, label_smoothing)
    sources = jnp.maximum(sources, 1.0)
    loss = o["mix"] * token_loss + risk * jax.lax.stop_gradient(denom / sources)
    kept = (_distinct(cands) & jnp.any(cands != PAD_ID, -1)) & jnp.any(batch["targets_segment_ids"] > 0, -1)[
        :, None
    ]
    reward = jnp.sum(jnp.where(kept, rewards, 0.0)) / jnp.maximum(jnp.sum(kept), 1)
    extras = {"mrt_reward": reward, "mrt_risk": risk / sources}  # over real, distinct candidates
    return loss, (denom, nll, correct, extras)
