"""Token-level losses returning (sum, denominator) so callers can average across devices/steps."""

from __future__ import annotations

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
