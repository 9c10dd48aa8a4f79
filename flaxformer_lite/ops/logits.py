"""Vocabulary logits through a tied embedding, with a CPU-friendly gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Float

from flaxformer_lite.ops.attention import target_backend

Array = jax.Array  # shapes in annotations: jaxtyping, checked by beartype in tests

# Backends on which `tied_logits` writes its own gradient (see there); elsewhere plain autodiff.
TRANSPOSED_GRAD_BACKENDS = ("cpu",)


def tied_logits(x: Float[Array, "*B D"], embedding: Float[Array, "V D"]) -> Float[Array, "*B V"]:
    """x E^T: [..., D] activations, [V, D] embedding table -> [..., V] logits.

    On CPU the embedding gradient is computed as (x^T g)^T, [D, V] then transposed, instead of
    autodiff's g^T x. XLA's CPU matmuls read the contracted axis of their left operand as its
    minor one, so g^T x copies the whole [tokens, V] logits gradient into [V, tokens] order first
    (the largest copy of an LM train step); x^T g copies the [tokens, D] activations instead, and
    the gradient is formed once. The value and the gradients are the same (up to summation order).
    """
    if target_backend() in TRANSPOSED_GRAD_BACKENDS:
        return _tied_logits(x, embedding)
    return _project(x, embedding)


def _project(x, embedding):
    return jnp.einsum("...d,vd->...v", x, embedding)  # [..., D] x [V, D] -> [..., V]


@jax.custom_vjp
def _tied_logits(x, embedding):
    return _project(x, embedding)


def _tied_logits_fwd(x, embedding):
    return _project(x, embedding), (x, embedding)


def _tied_logits_bwd(residuals, g):
    x, embedding = residuals
    dx = jnp.einsum("...v,vd->...d", g, embedding)  # [..., V] x [V, D] -> [..., D]
    rows = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # [M, D], [M, V]
    d_embedding = jnp.einsum("md,mv->dv", *rows).T  # [D, V] -> [V, D]
    return dx.astype(x.dtype), d_embedding.astype(embedding.dtype)


_tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)
