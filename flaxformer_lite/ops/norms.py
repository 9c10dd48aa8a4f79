"""Normalisation as pure functions; statistics in float32, output in the input's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Float

Array = jax.Array  # shapes in annotations: jaxtyping, checked by beartype in tests


def _row(v: Array, ndim: int) -> Array:
    """[D] -> [1, ..., 1, D] float32, so broadcasting against [..., D] is explicit."""
    return v.astype(jnp.float32).reshape((1,) * (ndim - 1) + (-1,))


def layer_norm(
    x: Float[Array, "*B D"],
    scale: Float[Array, " D"],
    bias: Float[Array, " D"] | None = None,
    eps: float = 1e-6,
) -> Float[Array, "*B D"]:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis: [..., D], [D], [D] -> [..., D]."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * _row(scale, x.ndim)
    if bias is not None:
        y = y + _row(bias, x.ndim)
    return y.astype(x.dtype)


def rms_norm(x: Float[Array, "*B D"], scale: Float[Array, " D"], eps: float = 1e-6) -> Float[Array, "*B D"]:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis: [..., D], [D] -> [..., D]."""
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(ms + eps) * _row(scale, x.ndim)).astype(x.dtype)
