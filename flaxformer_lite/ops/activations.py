"""Feed-forward activations by name; gated ones (GLU family) take two projections."""

from __future__ import annotations

import functools

import jax

Array = jax.Array

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's "gelu_new"
    "silu": jax.nn.silu,
}
# Gated variants: act(x W_gate) * (x W_up) (Shazeer 2020). SwiGLU is LLaMA's.
GATED_ACTIVATIONS = {"swiglu": jax.nn.silu, "geglu": ACTIVATIONS["gelu_tanh"]}


def gated(name: str, gate: Array, up: Array) -> Array:
    """act(gate) * up for a name in GATED_ACTIVATIONS."""
    return GATED_ACTIVATIONS[name](gate) * up
