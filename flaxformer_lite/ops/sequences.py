"""Token-sequence helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Int

Array = jax.Array  # shapes in annotations: jaxtyping, checked by beartype in tests


def shift_right(
    x: Int[Array, "B T"], segment_ids: Int[Array, "B T"] | None = None, pad_id: int = 0
) -> Int[Array, "B T"]:
    """Teacher-forcing decoder inputs: [B, T] -> [B, T] shifted one step right, pad_id first.

    With packed sequences (segment_ids [B, T]) each sequence starts with pad_id, so the first
    token of one sequence is never fed the last token of the previous one.
    """
    shifted = jnp.pad(x, ((0, 0), (1, 0)), constant_values=pad_id)[:, :-1]
    if segment_ids is not None:
        starts = segment_ids != jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
        shifted = jnp.where(starts, pad_id, shifted)
    return shifted
