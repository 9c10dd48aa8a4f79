"""Inverted dropout from 16 random bits per element."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Float

Array = jax.Array  # shapes in annotations: jaxtyping, checked by beartype in tests

_LEVELS = 1 << 16


def dropout(x: Float[Array, "*shape"], rate: float, rng: Array) -> Float[Array, "*shape"]:
    """Zero each element with probability ~rate and scale the rest by 1 / keep, any shape.

    Each element compares 16 random bits with a threshold, so one uint32 draw serves two elements;
    `jax.random.bernoulli` draws 32 bits per element. The keep probability is 1 - rate rounded to a
    multiple of 2^-16 (within 2^-17 of 1 - rate) and kept elements are divided by exactly that, so
    E[out] = x. The bits are drawn in the shape of x with the last axis halved (leading axes
    unchanged, so a sharded batch draws its own bits where it lives).
    """
    threshold = round((1.0 - rate) * _LEVELS)  # 16-bit draws below it keep their element
    if threshold >= _LEVELS:
        return x
    if threshold <= 0:
        return jnp.zeros_like(x)
    keep = threshold / _LEVELS
    shape = x.shape if x.ndim else (1,)
    last = shape[-1]
    words = jax.random.bits(rng, shape[:-1] + ((last + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)  # [..., ceil(D/2), 2]
    halves = halves.reshape(shape[:-1] + (2 * words.shape[-1],))[..., :last].reshape(x.shape)
    return jnp.where(halves < jnp.uint16(threshold), x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
