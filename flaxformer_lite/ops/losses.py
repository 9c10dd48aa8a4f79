"""Token-level losses returning (sum, denominator) so callers can average across devices/steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, Int, Num

Array = jax.Array  # shapes in annotations: jaxtyping, checked by beartype in tests


def cross_entropy(
    logits: Float[Array, "*B V"],
    targets: Int[Array, "*B"],
    weights: Num[Array, "*B"] | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Label-smoothed cross entropy: [B, T, V] logits, [B, T] ids, [B, T] weights -> (sum, denom).

    The smoothed target puts 1 - label_smoothing on the gold token and spreads label_smoothing
    evenly over the other V - 1 tokens; the entropy of that target is subtracted, so a perfect
    prediction of the smoothed distribution scores 0 (the Flax WMT example's definition).
    The log-softmax runs in float32 without materialising a one-hot [B, T, V] tensor.
    """
    vocab = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    gold = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    loss = -gold
    if label_smoothing > 0.0:
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab - 1)
        others = jnp.sum(logp, axis=-1) - gold
        entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
        loss = -(confidence * gold + low * others) - entropy
    if weights is None:
        weights = jnp.ones_like(loss)
    weights = weights.astype(jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(weights)


def accuracy(
    logits: Float[Array, "*B V"], targets: Int[Array, "*B"], weights: Num[Array, "*B"] | None = None
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Weighted count of argmax hits: [B, T, V], [B, T], [B, T] -> (correct, denom)."""
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    if weights is None:
        weights = jnp.ones_like(hits)
    weights = weights.astype(jnp.float32)
    return jnp.sum(hits * weights), jnp.sum(weights)


def token_losses(
    logits: Float[Array, "*B V"],
    targets: Int[Array, "*B"],
    weights: Num[Array, "*B"] | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """(smoothed loss sum, NLL sum, correct count, weight sum) from one pass over [..., V].

    Equal to `cross_entropy` with and without smoothing and to `accuracy` (an argmax tie counts as
    a hit), but a train step needs all three: the max and log-sum-exp are computed once, and the
    gradient is written directly as weights * (softmax - target) (custom VJP), so no [..., V]
    log-probability or one-hot tensor is stored for the backward pass. Weights get no gradient.
    """
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    return _token_losses(logits, targets, weights, float(label_smoothing))


def _smoothing_constants(vocab: int, label_smoothing: float):
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    return confidence, low, entropy


def _token_losses_fwd(logits, targets, weights, label_smoothing):
    vocab = logits.shape[-1]
    x = logits.astype(jnp.float32)
    top = jnp.max(x, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(x - top[..., None]), axis=-1))
    gold_logit = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    gold = gold_logit - lse  # log p(gold)
    nll = -gold
    loss = nll
    if label_smoothing > 0.0:
        confidence, low, entropy = _smoothing_constants(vocab, label_smoothing)
        others = jnp.sum(x, axis=-1) - vocab * lse - gold  # sum of log p over the other tokens
        loss = -(confidence * gold + low * others) - entropy
    hits = (gold_logit >= top).astype(jnp.float32)
    sums = tuple(jnp.sum(v * weights) for v in (loss, nll, hits)) + (jnp.sum(weights),)
    return sums, (logits, targets, weights, lse)


def _token_losses_bwd(label_smoothing, residuals, cotangents):
    logits, targets, weights, lse = residuals
    g_loss, g_nll = cotangents[0], cotangents[1]  # counts and weight sums have no gradient
    vocab = logits.shape[-1]
    p = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    gold = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    if label_smoothing > 0.0:
        confidence, low, _ = _smoothing_constants(vocab, label_smoothing)
        target = jnp.where(gold, confidence, low)
        grad = g_loss * (p - target) + g_nll * (p - gold)
    else:
        grad = (g_loss + g_nll) * (p - gold)
    return (grad * weights[..., None]).astype(logits.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_losses(logits, targets, weights, label_smoothing):
    return _token_losses_fwd(logits, targets, weights, label_smoothing)[0]


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)
