"""The FLOP formula used for MFU against XLA's own count of the compiled forward pass."""

import jax
import jax.numpy as jnp
import pytest

import flaxformer_lite as fl
from flaxformer_lite.model import flops


def _xla_flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return analysis["flops"]


# Widths large enough that matmuls dominate (XLA also counts softmax, norms, activations).
WIDE = dict(d_model=256, num_heads=4, d_ff=1024, vocab_size=1031, dropout_rate=0.0, deterministic=True)


@pytest.mark.parametrize(
    "variant",
    [
        dict(num_decoder_layers=2),
        dict(num_decoder_layers=2, num_kv_heads=1, activation="swiglu", position="rope", use_bias=False),
    ],
)
def test_decoder_only_formula_matches_xla(variant):
    cfg = fl.tiny(**{**WIDE, **variant})
    model, tokens = fl.DecoderOnly(cfg), jnp.ones((1, 128), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
    counted = _xla_flops(lambda p, t: model.apply(p, t), params, tokens)
    formula = flops.forward_flops(cfg, 128)
    assert formula <= counted <= 1.02 * formula, (formula, counted)


def test_encoder_decoder_formula_matches_xla_without_double_counting():
    cfg = fl.tiny(**WIDE, num_encoder_layers=2, num_decoder_layers=2)
    model = fl.EncoderDecoder(cfg)
    src, tgt = jnp.ones((1, 96), jnp.int32), jnp.ones((1, 64), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), src, tgt))
    counted = _xla_flops(lambda p, s, t: model.apply(p, s, t), params, src, tgt)
    formula = flops.forward_flops(cfg, target_len=64, source_len=96)
    assert formula <= counted <= 1.02 * formula, (formula, counted)


def test_peaks_by_device_kind():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert flops.peak_tflops("cpu") is None
