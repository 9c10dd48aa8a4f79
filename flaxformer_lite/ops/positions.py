"""Position encodings: sinusoidal tables, rotary embeddings, T5 relative buckets and ALiBi."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, Int

Array = jax.Array  # shapes in annotations: jaxtyping, checked by beartype in tests


def sinusoidal_embedding(
    positions: Int[Array, "*P"], dim: int, max_timescale: float = 10_000.0
) -> Float[Array, "*P {dim}"]:
    """[...] integer positions -> [..., dim] float32, the paper's interleaved formula.

    PE(pos, 2i) = sin(pos / max_timescale^(2i/dim)) and PE(pos, 2i+1) = cos(same angle)
    ("Attention Is All You Need", section 3.5). `dim` must be even.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim, got {dim}.")
    inv_freq = max_timescale ** (-np.arange(0, dim, 2, dtype=np.float32) / dim)  # [dim/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.reshape((1,) * positions.ndim + (-1,))
    # Interleave: [..., dim/2, 2] -> [..., dim] with sin at even and cos at odd indices.
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], dim)


SINUSOID_LAYOUTS = ("interleaved", "concat")


@functools.lru_cache(maxsize=16)
def sinusoidal_table(
    length: int, dim: int, max_timescale: float = 10_000.0, layout: str = "interleaved"
) -> np.ndarray:
    """[length, dim] float32 host table of `sinusoidal_embedding` for positions 0..length-1.

    layout "interleaved" is the paper's (sin at even, cos at odd channels); "concat" puts the same
    sines in the first half and the cosines in the second (Marian, tensor2tensor). Built once with
    numpy (read-only, cached) so that a jitted step gathers rows from a constant instead of
    evaluating sin/cos for every token of every batch.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim, got {dim}.")
    if layout not in SINUSOID_LAYOUTS:
        raise ValueError(f"sinusoid layout {layout!r} is not one of {SINUSOID_LAYOUTS}.")
    inv_freq = max_timescale ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
    axis = -1 if layout == "interleaved" else 1
    table = np.stack([np.sin(angles), np.cos(angles)], axis=axis).reshape(length, dim).astype(np.float32)
    table.flags.writeable = False
    return table


def apply_rope(
    x: Float[Array, "B T N H"], positions: Int[Array, "B T"], theta: float = 10_000.0
) -> Float[Array, "B T N H"]:
    """Rotary position embedding, half-split convention (LLaMA, GPT-NeoX): [B,T,N,H], [B,T] -> same.

    Channel i pairs with channel i + H/2 and the pair turns by positions * theta^(-2i/H).
    Computed in float32 and returned in x's dtype. Position 0 is the identity.
    """
    H = x.shape[-1]
    if H % 2:
        raise ValueError(f"RoPE needs an even head dim, got {H}.")
    inv_freq = theta ** (-np.arange(0, H, 2, dtype=np.float32) / H)  # [H/2]
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None, :]  # [B,T,1,H/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # each [B, T, N, H/2]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def relative_position_bucket(
    relative_position: Array,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Array:
    """T5's bucketing of (key - query) offsets: exact for small offsets, log-spaced beyond.

    Half the buckets (all of them if not bidirectional) cover offsets 0..max_exact-1 one each;
    the rest cover up to max_distance logarithmically; farther offsets share the last bucket.
    """
    ret = jnp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(relative_position.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    scaled = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


def relative_position_bias(
    q_positions: Array,
    kv_positions: Array,
    table: Array,
    *,
    bidirectional: bool,
    max_distance: int = 128,
) -> Array:
    """[B,T], [B,S] positions and a [num_buckets, N] table -> [B, N, T, S] attention bias."""
    relative = kv_positions[:, None, :] - q_positions[:, :, None]  # [B, T, S]
    buckets = relative_position_bucket(
        relative,
        bidirectional=bidirectional,
        num_buckets=table.shape[0],
        max_distance=max_distance,
    )
    return jnp.moveaxis(jnp.asarray(table)[buckets], -1, 1)  # [B, T, S, N] -> [B, N, T, S]


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ...

    For a head count that is not a power of two, the paper's recipe interleaves the slopes of
    the next power of two.
    """

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest < num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, dtype=np.float32)


def alibi_bias(q_positions: Array, kv_positions: Array, num_heads: int) -> Array:
    """[B,T], [B,S] positions -> [B, N, T, S] bias -slope_n * |q - k|: nearby keys are favoured."""
    distance = jnp.abs(q_positions[:, :, None] - kv_positions[:, None, :]).astype(jnp.float32)
    return -alibi_slopes(num_heads)[None, :, None, None] * distance[:, None, :, :]
