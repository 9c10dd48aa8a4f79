import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flaxformer_lite as fl

B, L = 2, 9
VARIANTS = {  # DecoderOnly variants: every position scheme, MHA/GQA/MQA, norms, activations
    "learned_gelu_pre": dict(position="learned", activation="gelu_tanh", pre_norm=True),
    "rope_gqa_rms_swiglu": dict(
        position="rope",
        norm="rmsnorm",
        activation="swiglu",
        use_bias=False,
        tie_embeddings=False,
        pre_norm=True,
    ),
    "relative_post": dict(position="relative", num_kv_heads=4),
    "alibi_mqa_window": dict(position="alibi", num_kv_heads=1, local_window=4),
    "sinusoidal_geglu": dict(position="sinusoidal", activation="geglu"),
}


def _tokens(shape, seed=0, vocab=67):
    return jax.random.randint(jax.random.key(seed), shape, 1, vocab)


def _init(model, *args, **kwargs):
    return jax.jit(lambda a, k: model.init(jax.random.key(42), *a, **k))(args, kwargs)["params"]


def _apply(model, variables, *args, method=None, mutable=False, **kwargs):
    """model.apply under one jit (eager op-by-op dispatch is far slower on CPU)."""
    fn = lambda v, a, k: model.apply(v, *a, method=method, mutable=mutable, **k)
    return jax.jit(fn)(variables, args, kwargs)


# ---------------------------------------------------------------- parameter counts (closed forms)


def _layer_count(d, f, heads_dim, kv_dim, *, bias, ln_bias, gated, n_attn, n_norms):
    attn = d * heads_dim * 2 + d * kv_dim * 2 + (heads_dim * 2 + kv_dim * 2 - heads_dim + d if bias else 0)
    mlp = d * f * (3 if gated else 2) + ((f * (2 if gated else 1) + d) if bias else 0)
    return n_attn * attn + mlp + n_norms * d * (2 if ln_bias else 1)


def _count(cfg, model_cls, *args):
    shapes = jax.eval_shape(lambda: model_cls(cfg).init(jax.random.key(0), *args))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_gpt2_small_has_124_4m_parameters():
    # wte 50257*768 + wpe 1024*768 + 12 * (qkv 768*2304+2304, proj 768*768+768, mlp 2*768*3072+3072+768,
    # 2 LayerNorms 4*768) + final LayerNorm 2*768 = 124,439,808 (HuggingFace's count for "gpt2").
    tokens = jnp.zeros((1, 8), jnp.int32)
    assert _count(fl.gpt2_small(), fl.DecoderOnly, tokens) == 124_439_808


def test_transformer_base_and_llama_counts_match_closed_forms():
    src = jnp.zeros((1, 8), jnp.int32)
    cfg = fl.transformer_base()  # post-LN, sinusoidal, tied shared embeddings
    d, f, V = 512, 2048, 32000
    enc = _layer_count(d, f, d, d, bias=True, ln_bias=True, gated=False, n_attn=1, n_norms=2)
    dec = _layer_count(d, f, d, d, bias=True, ln_bias=True, gated=False, n_attn=2, n_norms=3)
    assert _count(cfg, fl.EncoderDecoder, src, src) == V * d + 6 * enc + 6 * dec == 60_522_496
    cfg = fl.llama_small()  # untied head, GQA 12/4 heads of 64, RMSNorm, SwiGLU, final norm
    layer = _layer_count(768, 2048, 768, 256, bias=False, ln_bias=False, gated=True, n_attn=1, n_norms=2)
    assert _count(cfg, fl.DecoderOnly, src) == 2 * 32000 * 768 + 12 * layer + 768
    big = _count(fl.transformer_big(), fl.EncoderDecoder, src, src)
    d, f = 1024, 4096
    enc = _layer_count(d, f, d, d, bias=True, ln_bias=True, gated=False, n_attn=1, n_norms=2)
    dec = _layer_count(d, f, d, d, bias=True, ln_bias=True, gated=False, n_attn=2, n_norms=3)
    assert big == V * d + 6 * enc + 6 * dec


# ---------------------------------------------------------------- logical axes


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("model_cls", [fl.EncoderDecoder, fl.DecoderOnly, fl.EncoderOnly])
def test_every_parameter_carries_logical_axes(model_cls, scan):
    cfg = fl.tiny(
        position="relative" if model_cls is not fl.DecoderOnly else "learned",
        tie_embeddings=model_cls is not fl.DecoderOnly,
        scan_layers=scan,
    )
    args = (_tokens((B, 5)),) * (2 if model_cls is fl.EncoderDecoder else 1)
    boxed = jax.eval_shape(lambda: model_cls(cfg).init(jax.random.key(0), *args))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f"unannotated parameter {leaf}"
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= set(fl.AXES)
        if scan and leaf.value.ndim >= 2 and "layers" in leaf.names:
            assert leaf.names[0] == "layers"
    if scan:
        assert any("layers" in leaf.names for leaf in leaves)


# ---------------------------------------------------------------- scan == unrolled


def _stack_layers(params, n):
    """Unrolled params (layer_0..layer_{n-1}) -> scanned layout (one `layers` entry, stacked)."""
    if not isinstance(params, dict):
        return params
    out = {k: _stack_layers(v, n) for k, v in params.items() if not k.startswith("layer_")}
    if "layer_0" in params:
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layer_{i}"] for i in range(n)])
    return out


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_equals_unrolled(remat):
    cfg = fl.tiny(position="rope", pre_norm=True)
    src, tgt = _tokens((B, 7)), _tokens((B, 5), seed=1)
    params = nn.unbox(_init(fl.EncoderDecoder(cfg), src, tgt))
    want = _apply(fl.EncoderDecoder(cfg), {"params": params}, src, tgt)
    scan_cfg = cfg.replace(scan_layers=True, remat_policy=remat)
    got = _apply(fl.EncoderDecoder(scan_cfg), {"params": _stack_layers(params, 2)}, src, tgt)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- KV cache == full forward


def _decode_lm(cfg, params, tokens, prompt_len, segment_ids=None):
    """Prefill `prompt_len` tokens, then one token at a time; returns logits for every position."""
    model = fl.DecoderOnly(cfg.replace(decode=True, deterministic=True))
    _, state = _apply(model, {"params": params}, jnp.zeros_like(tokens), mutable=["cache"])
    step = jax.jit(
        lambda state, t, seg: model.apply({"params": params, **state}, t, segment_ids=seg, mutable=["cache"])
    )
    chunks = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, tokens.shape[1])]
    out = []
    for a, b in chunks:
        seg = None if segment_ids is None else segment_ids[:, a:b]
        logits, state = step(state, tokens[:, a:b], seg)
        out.append(logits)
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize(
    "variant,scan", [(v, False) for v in sorted(VARIANTS)] + [("rope_gqa_rms_swiglu", True)]
)
def test_decoder_only_kv_cache_equals_full_forward(variant, scan):
    cfg = fl.tiny(max_len=L, scan_layers=scan, **VARIANTS[variant])
    tokens = _tokens((B, L))
    params = nn.unbox(_init(fl.DecoderOnly(cfg), tokens))
    full = _apply(fl.DecoderOnly(cfg.replace(deterministic=True)), {"params": params}, tokens)
    np.testing.assert_allclose(_decode_lm(cfg, params, tokens, prompt_len=3), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["rope_gqa_rms_swiglu", "relative_post", "alibi_mqa_window"])
def test_left_padded_prompt_decodes_like_unpadded(variant):
    cfg = fl.tiny(max_len=L, **VARIANTS[variant])
    tokens = _tokens((1, L - 2))
    params = nn.unbox(_init(fl.DecoderOnly(cfg), tokens))
    plain = _decode_lm(cfg, params, tokens, prompt_len=3)
    padded = jnp.concatenate([jnp.zeros((1, 2), jnp.int32), tokens], axis=1)
    segs = (padded != 0).astype(jnp.int32).at[:, :2].set(0)
    got = _decode_lm(cfg, params, padded, prompt_len=5, segment_ids=segs)[:, 2:]
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "position,scan", [("sinusoidal", False), ("rope", False), ("relative", False), ("learned", True)]
)
def test_encoder_decoder_kv_cache_equals_full_forward(position, scan):
    cfg = fl.tiny(max_len=L, position=position, scan_layers=scan)
    src = _tokens((B, 7)).at[1, 5:].set(0)  # second source padded
    tgt_in = _tokens((B, L), seed=1)
    params = nn.unbox(_init(fl.EncoderDecoder(cfg), src, tgt_in))
    full = _apply(fl.EncoderDecoder(cfg.replace(deterministic=True)), {"params": params}, src, tgt_in)
    model = fl.EncoderDecoder(cfg.replace(decode=True, deterministic=True))
    encoded = _apply(model, {"params": params}, src, method="encode")
    _, state = _apply(
        model,
        {"params": params},
        encoded,
        jnp.zeros_like(tgt_in),
        inputs=src,
        method="decode",
        mutable=["cache"],
    )
    step = jax.jit(
        lambda state, t: model.apply({"params": params, **state}, None, t, method="decode", mutable=["cache"])
    )
    steps = []
    for t in range(L):
        logits, state = step(state, tgt_in[:, t : t + 1])
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- padding and packing


def test_extra_source_padding_never_changes_translation_logits():
    cfg = fl.tiny(position="relative", deterministic=True)
    src, tgt = _tokens((B, 6)), _tokens((B, 5), seed=1)
    params = _init(fl.EncoderDecoder(cfg), src, tgt)
    model = fl.EncoderDecoder(cfg)
    padded = jnp.pad(src, ((0, 0), (0, 4)))
    np.testing.assert_allclose(
        _apply(model, {"params": params}, padded, tgt),
        _apply(model, {"params": params}, src, tgt),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("variant", ["learned_gelu_pre", "rope_gqa_rms_swiglu", "relative_post"])
def test_packed_lm_rows_equal_separate_sequences(variant):
    cfg = fl.tiny(deterministic=True, **VARIANTS[variant])
    a, b = _tokens((1, 4), seed=1), _tokens((1, 5), seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 4 + [2] * 5])
    pos = jnp.array([list(range(4)) + list(range(5))])
    model = fl.DecoderOnly(cfg)
    params = _init(model, packed)
    got = _apply(model, {"params": params}, packed, segment_ids=seg, positions=pos)
    want = jnp.concatenate(
        [_apply(model, {"params": params}, a), _apply(model, {"params": params}, b)], axis=1
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_packed_translation_pairs_equal_separate_pairs():
    cfg = fl.tiny(position="sinusoidal", deterministic=True)
    model = fl.EncoderDecoder(cfg)
    s1, s2, t1, t2 = _tokens((1, 3), 1), _tokens((1, 4), 2), _tokens((1, 2), 3), _tokens((1, 5), 4)
    params = _init(model, s1, t1)
    want = jnp.concatenate(
        [_apply(model, {"params": params}, s1, t1), _apply(model, {"params": params}, s2, t2)], 1
    )
    got = _apply(
        model,
        {"params": params},
        jnp.concatenate([s1, s2], 1),
        jnp.concatenate([t1, t2], 1),
        inputs_segment_ids=jnp.array([[1] * 3 + [2] * 4]),
        inputs_positions=jnp.array([[0, 1, 2, 0, 1, 2, 3]]),
        decoder_segment_ids=jnp.array([[1] * 2 + [2] * 5]),
        decoder_positions=jnp.array([[0, 1, 0, 1, 2, 3, 4]]),
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_encoder_only_heads_and_padding():
    cfg = fl.tiny(num_classes=3, deterministic=True)
    tokens = _tokens((B, 6))
    model = fl.EncoderOnly(cfg)
    params = _init(model, tokens)
    mlm, cls = _apply(model, {"params": params}, tokens)
    assert mlm.shape == (B, 6, cfg.vocab_size) and cls.shape == (B, 3)
    mlm_pad, cls_pad = _apply(model, {"params": params}, jnp.pad(tokens, ((0, 0), (0, 3))))
    np.testing.assert_allclose(mlm_pad[:, :6], mlm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cls_pad, cls, rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_float32_params():
    cfg = fl.tiny(dtype="bfloat16")
    tokens = _tokens((B, 5))
    params = _init(fl.DecoderOnly(cfg), tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(params)))
    logits = _apply(fl.DecoderOnly(cfg.replace(deterministic=True)), {"params": params}, tokens)
    assert logits.dtype == jnp.bfloat16 and np.all(np.isfinite(logits.astype(np.float32)))


def test_dropout_needs_rng_and_changes_outputs():
    cfg = fl.tiny(dropout_rate=0.3, attention_dropout_rate=0.2)
    tokens = _tokens((B, 5))
    params = _init(fl.DecoderOnly(cfg), tokens)
    a = _apply(fl.DecoderOnly(cfg), {"params": params}, tokens, rngs={"dropout": jax.random.key(1)})
    b = _apply(fl.DecoderOnly(cfg), {"params": params}, tokens, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    c = _apply(fl.DecoderOnly(cfg.replace(deterministic=True)), {"params": params}, tokens)
    d = _apply(fl.DecoderOnly(cfg.replace(deterministic=True)), {"params": params}, tokens)
    np.testing.assert_array_equal(c, d)


# ---------------------------------------------------------------- bad config


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(d_model=30, num_heads=4), r"ModelConfig.num_heads=4 .*divisor of d_model=30"),
        (dict(num_heads=8, num_kv_heads=3), r"ModelConfig.num_kv_heads=3 .*divisor of num_heads=8"),
        (dict(activation="swish"), r"ModelConfig.activation='swish' .*use one of"),
        (dict(norm="batchnorm"), r"ModelConfig.norm="),
        (dict(position="absolute"), r"ModelConfig.position="),
        (dict(dropout_rate=1.5), r"ModelConfig.dropout_rate=1.5 .*\[0, 1\)"),
        (dict(remat_policy="some"), r"ModelConfig.remat_policy="),
        (dict(d_model=36, num_heads=4, head_dim=9, position="rope"), r"ModelConfig.head_dim=9 .*even"),
    ],
)
def test_bad_config_names_field_and_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        fl.ModelConfig(**fields)


def test_presets_by_name():
    assert fl.preset("tiny", position="rope").position == "rope"
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        fl.preset("gpt5")


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_key_bias_changes_nothing_unless_rope_rotates_it(position):
    """Softmax ignores q.b added to all of a query's logits: such a key bias gets no gradient."""
    cfg = fl.tiny(position=position, use_bias=True, pre_norm=True)
    model, tokens = fl.DecoderOnly(cfg), _tokens((B, L))
    params = nn.unbox(_init(model, tokens))
    is_key_bias = lambda path, _: [k.key for k in path[-2:]] == ["key", "bias"]  # noqa: E731
    shifted = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 if is_key_bias(p, x) else x, params
    )  # fmt: skip
    same = np.allclose(
        _apply(model, {"params": params}, tokens), _apply(model, {"params": shifted}, tokens), atol=1e-5
    )
    assert same == (position != "rope")
    loss = lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    key_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if is_key_bias(path, g)]
    assert key_grads and all(bool(jnp.all(g == 0)) == (position != "rope") for g in key_grads)
