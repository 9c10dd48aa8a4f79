"""Flax Linen building blocks: they own parameters and call the pure functions in `ops`.

Every parameter carries logical axis names from one vocabulary (see AXES); activations are
constrained at block boundaries. `sharding.py` maps the names to mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.sharding import (  # the logical axis names (one vocabulary, see sharding.py)
    BATCH,
    EMBED,
    LENGTH,
    MLP,
    VOCAB,
)

Array = jax.Array

ACTIVATION_AXES = (BATCH, LENGTH, EMBED)


class Dense(nn.Module):
    """y = x W (+ b), contracting the last `in_axes` axes of x; logical axes on W (inputs first) and b.

    The kernel is created in its final shape, so Xavier fan-in/fan-out count the right axes.
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    config: ModelConfig
    in_axes: int = 1
    constant_bias: bool = False  # the bias provably has zero gradient: apply it without one

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        kernel_shape = x.shape[x.ndim - self.in_axes :] + self.features
        contract = tuple(range(self.in_axes))
        if cfg.init_std is None:
            out_axis = tuple(range(self.in_axes, len(kernel_shape)))
            init = nn.initializers.variance_scaling(
                1.0, "fan_avg", "uniform", in_axis=contract, out_axis=out_axis
            )
        else:
            init = nn.initializers.normal(cfg.init_std)
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, self.axes), kernel_shape, cfg.param_dtype
        )
        x_axes = tuple(range(x.ndim - self.in_axes, x.ndim))
        y = jax.lax.dot_general(x.astype(cfg.dtype), kernel.astype(cfg.dtype), ((x_axes, contract), ((), ())))
        if cfg.use_bias:
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.in_axes :])
            bias = self.param("bias", zeros, self.features, cfg.param_dtype)
            if self.constant_bias:  # its true gradient is 0; Adam would amplify round-off into steps
                bias = jax.lax.stop_gradient(bias)
            y = y + bias.astype(cfg.dtype).reshape((1,) * (y.ndim - len(self.features)) + self.features)
        return y


def dense(cfg: ModelConfig, features, axes: tuple[str, ...], name: str, in_axes: int = 1, **kw) -> Dense:
    """A `Dense` to `features` (an int or a tuple) with logical `axes` (input axes first)."""
    features = features if isinstance(features, tuple) else (features,)
    return Dense(features, axes, cfg, in_axes, name=name, **kw)


class Norm(nn.Module):
    """LayerNorm (scale and, with use_bias, bias) or RMSNorm (scale only) over the last axis."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        ones = nn.with_logical_partitioning(nn.initializers.ones, (EMBED,))
        scale = self.param("scale", ones, (x.shape[-1],), cfg.param_dtype)
        if cfg.norm == "rmsnorm":
            return ops.rms_norm(x, scale, cfg.norm_eps)
        bias = None
        if cfg.use_bias:
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,))
            bias = self.param("bias", zeros, (x.shape[-1],), cfg.param_dtype)
        return ops.layer_norm(x, scale, bias, cfg.norm_eps)


class Dropout(nn.Module):
    """`ops.dropout` (16 random bits per element) with the "dropout" rng; identity when deterministic."""

    rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.deterministic or self.rate == 0.0:
            return x
        return ops.dropout(x, self.rate, self.make_rng("dropout"))


class Embed(nn.Module):
    """A [num_embeddings, d_model] table; `attend` gives logits through its transpose (tying)."""

    num_embeddings: int
    config: ModelConfig
    scale: bool = False  # multiply looked-up vectors by sqrt(d_model)
    axes: tuple[str, str] = (VOCAB, EMBED)

    def setup(self):
        cfg = self.config
        std = cfg.init_std if cfg.init_std is not None else cfg.d_model**-0.5
        init = nn.with_logical_partitioning(nn.initializers.normal(std), self.axes)
        self.embedding = self.param("embedding", init, (self.num_embeddings, cfg.d_model), cfg.param_dtype)

    def __call__(self, ids: Array) -> Array:
        """[B, T] int -> [B, T, d_model] in the compute dtype."""
        x = jnp.take(self.embedding, ids, axis=0).astype(self.config.dtype)
        return x * jnp.sqrt(jnp.asarray(self.config.d_model, x.dtype)) if self.scale else x

    def attend(self, x: Array) -> Array:
        """[B, T, d_model] -> [B, T, num_embeddings] logits."""
        dtype = self.config.dtype
        return ops.tied_logits(x.astype(dtype), self.embedding.astype(dtype))  # [B, T, V]


class Mlp(nn.Module):
    """Position-wise feed-forward: d_model -> d_ff (activation, or GLU gate) -> d_model."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        if cfg.gated:
            gate = dense(cfg, cfg.d_ff, (EMBED, MLP), "wi_gate")(x)
            up = dense(cfg, cfg.d_ff, (EMBED, MLP), "wi_up")(x)
            h = ops.gated(cfg.activation, gate, up)
        else:
            h = ops.ACTIVATIONS[cfg.activation](dense(cfg, cfg.d_ff, (EMBED, MLP), "wi")(x))
        h = nn.with_logical_constraint(h, (BATCH, LENGTH, MLP))
        return dense(cfg, cfg.d_model, (MLP, EMBED), "wo")(h)
