"""Transformer blocks: encoder and decoder layers (attention + feed-forward, pre- or post-norm) and
the stack of them, looped or under `nn.scan`, with rematerialisation as configured."""

from __future__ import annotations

import jax
from flax import linen as nn

from flaxformer_lite.config import REMAT_POLICIES, ModelConfig
from flaxformer_lite.model import memory
from flaxformer_lite.model.attention import MultiHeadAttention
from flaxformer_lite.model.layers import ACTIVATION_AXES, Dropout, Mlp, Norm
from flaxformer_lite.sharding import LAYERS

Array = jax.Array


def residual(cfg: ModelConfig, fn, x: Array, norm_name: str) -> Array:
    """Pre-LN `x + drop(fn(norm(x)))` or post-LN `norm(x + drop(fn(x)))`, by config.pre_norm."""
    drop = Dropout(cfg.dropout_rate, cfg.deterministic)
    if cfg.pre_norm:
        return x + drop(fn(Norm(cfg, name=norm_name)(x)))
    return Norm(cfg, name=norm_name)(x + drop(fn(x)))


class EncoderLayer(nn.Module):
    """Bidirectional self-attention then feed-forward, each in a residual block."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        relative_table: Array | None = None,
    ):
        cfg = self.config
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        attn = MultiHeadAttention(cfg, name="self_attention")
        x = residual(
            cfg,
            lambda h: attn(h, segment_ids=segment_ids, positions=positions, relative_table=relative_table),
            x,
            "attention_norm",
        )
        x = residual(cfg, Mlp(cfg, name="mlp"), x, "mlp_norm")
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        return (x, None) if cfg.scan_layers else x


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder (if `cross`), feed-forward."""

    config: ModelConfig
    cross: bool = True

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array | None = None,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        encoded_segment_ids: Array | None = None,
        relative_table: Array | None = None,
    ):
        cfg = self.config
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        attn = MultiHeadAttention(cfg, causal=True, name="self_attention")
        x = residual(
            cfg,
            lambda h: attn(h, segment_ids=segment_ids, positions=positions, relative_table=relative_table),
            x,
            "attention_norm",
        )
        if self.cross:
            xattn = MultiHeadAttention(cfg, cross=True, name="cross_attention")
            x = residual(
                cfg,
                lambda h: xattn(h, encoded, segment_ids=segment_ids, context_segment_ids=encoded_segment_ids),
                x,
                "cross_attention_norm",
            )
        x = residual(cfg, Mlp(cfg, name="mlp"), x, "mlp_norm")
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        return (x, None) if cfg.scan_layers else x


def run_layers(cfg: ModelConfig, layer_cls, num_layers: int, x: Array, *args, **layer_kwargs) -> Array:
    """`num_layers` layers in sequence: a Python loop, or `nn.scan` with params stacked on "layers".

    With remat, each layer's activations are recomputed in the backward pass per the named policy.
    Call inside a compact module: layers are named `layer_{i}` (loop) or `layers` (scan).
    """
    if cfg.remat_policy != "none":
        layer_cls = nn.remat(
            layer_cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
        )
    if cfg.scan_layers:
        scanned = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "cache": 0, "intermediates": 0, memory.MEMORY: 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: LAYERS},
        )
        x, _ = scanned(cfg, name="layers", **layer_kwargs)(x, *args)
        return x
    for i in range(num_layers):
        x = layer_cls(cfg, name=f"layer_{i}", **layer_kwargs)(x, *args)
    return x
