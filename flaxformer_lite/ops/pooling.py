"""Sequence pooling for classification heads: one vector per (packed) sequence of a row.

A row holds up to S sequences, numbered 1..S by its segment ids (0 = padding), each contiguous
(the packer's layout). Pooling is a [B, S, T] weight matrix, so the pooled vectors are one
einsum with the hidden states, whatever the rule: BERT reads each sequence's first token
([CLS]), GPT its last real token (the only one that has seen the whole sequence under a causal
mask), or the mean of its tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Bool, Float, Int

Array = jax.Array  # shapes in annotations: jaxtyping, checked by beartype in tests

POOLINGS = ("first", "last", "mean")


def _members(segment_ids: Int[Array, "B T"], num_segments: int) -> Bool[Array, "B S T"]:
    """Whether token t of a row belongs to its sequence s + 1."""
    ids = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
    return segment_ids[:, None, :] == ids[None, :, None]


def pooling_weights(segment_ids: Int[Array, "B T"], how: str, num_segments: int) -> Float[Array, "B S T"]:
    """[B, T] segment ids -> [B, S, T] weights that pool each sequence (rows of absent ones are 0).

    how: "first" (its first token), "last" (its last token) or "mean" (1/length on each token).
    """
    if how not in POOLINGS:
        raise ValueError(f"pooling={how!r}; use one of {POOLINGS}")
    members = _members(segment_ids, num_segments)
    if how == "mean":
        counts = jnp.sum(members, axis=-1, keepdims=True)
        return members / jnp.maximum(counts, 1)
    if how == "first":
        neighbour = jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]  # the token before (0 before t=0)
    else:
        neighbour = jnp.pad(segment_ids, ((0, 0), (0, 1)))[:, 1:]  # the token after (0 after the end)
    edge = segment_ids != neighbour  # a sequence starts (or ends) here
    return (members & edge[:, None, :]).astype(jnp.float32)


def present_segments(segment_ids: Int[Array, "B T"], num_segments: int) -> Float[Array, "B S"]:
    """1.0 where sequence s + 1 of the row exists (the loss weight of its pooled vector), else 0."""
    return jnp.any(_members(segment_ids, num_segments), axis=-1).astype(jnp.float32)


def pool(hidden: Float[Array, "B T D"], weights: Float[Array, "B S T"]) -> Float[Array, "B S D"]:
    """[B, T, D] hidden states -> [B, S, D] pooled vectors, in the hidden states' dtype."""
    return jnp.einsum("bst,btd->bsd", weights.astype(hidden.dtype), hidden)


def segment_values(values: Int[Array, "B T"], segment_ids: Int[Array, "B T"], num_segments: int):
    """[B, T] per-token values constant within each sequence (labels) -> [B, S] one per sequence."""
    first = pooling_weights(segment_ids, "first", num_segments)
    return jnp.einsum("bst,bt->bs", first, values.astype(jnp.float32)).round().astype(jnp.int32)
