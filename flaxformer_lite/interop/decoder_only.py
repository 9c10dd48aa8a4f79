"""GPT-2 and the LLaMA family (LLaMA, Mistral) <-> our DecoderOnly: configs and name tables.

- GPT-2 uses Conv1D, weights stored [in, out]; q, k, v are one fused [d, 3d] `c_attn` (split and
  joined in `hf.py`).
- LLaMA uses torch Linear, weights stored [out, in]; its checkpoints already use the half-split
  ("rotate_half") RoPE layout that `ops.apply_rope` implements, so no permutation is needed.
"""

from __future__ import annotations

from flaxformer_lite.config import ModelConfig

GPT2_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


def gpt2_config(hf: dict, unsupported) -> ModelConfig:
    unsupported(
        hf,
        {
            "activation_function": lambda v: v in GPT2_ACTIVATIONS,
            "scale_attn_weights": bool,
            "scale_attn_by_inverse_layer_idx": lambda v: not v,
            "reorder_and_upcast_attn": lambda v: True,  # numerics only: fp32 attention, as ours
            "tie_word_embeddings": bool,
        },
    )
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=d,
        num_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d,
        num_encoder_layers=0,
        num_decoder_layers=hf["n_layer"],
        activation=GPT2_ACTIVATIONS[hf.get("activation_function", "gelu_new")],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        pre_norm=True,
        position="learned",
        max_len=hf["n_positions"],
        scale_embeddings=False,
        dropout_rate=0.0,
    )


def _default_rope(v) -> bool:
    return v is None or v.get("rope_type", v.get("type", "default")) == "default"


def llama_config(hf: dict, unsupported) -> ModelConfig:
    unsupported(
        hf,
        {
            "hidden_act": lambda v: v == "silu",
            "rope_scaling": _default_rope,  # transformers 4
            "rope_parameters": _default_rope,  # transformers 5
            "attention_bias": lambda v: not v,
            "mlp_bias": lambda v: not v,
        },
    )
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10_000.0)
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        d_ff=hf["intermediate_size"],
        num_encoder_layers=0,
        num_decoder_layers=hf["num_hidden_layers"],
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        pre_norm=True,
        position="rope",
        rope_theta=float(theta),
        max_len=hf.get("max_position_embeddings", 2048),
        local_window=hf.get("sliding_window") if hf["model_type"] == "mistral" else None,
        use_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        scale_embeddings=False,
        dropout_rate=0.0,
    )


def config_to_hf(cfg: ModelConfig) -> dict | None:
    """config.json for a GPT-2- or LLaMA-shaped ModelConfig; None for any other."""
    if is_gpt2(cfg):
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_head": cfg.num_heads,
            "n_inner": cfg.d_ff,
            "n_layer": cfg.num_decoder_layers,
            "n_positions": cfg.max_len,
            "activation_function": {v: k for k, v in GPT2_ACTIVATIONS.items()}[cfg.activation],
            "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": True,
        }
    if is_llama(cfg):
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.num_decoder_layers,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,  # transformers 4
            "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},  # transformers 5
            "max_position_embeddings": cfg.max_len,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
        }
    return None


def is_gpt2(c: ModelConfig) -> bool:
    return (c.pre_norm, c.norm, c.position, c.use_bias, c.tie_embeddings, c.scale_embeddings) == (
        True, "layernorm", "learned", True, True, False,
    ) and c.activation in GPT2_ACTIVATIONS.values() and c.head_dim * c.num_heads == c.d_model  # fmt: skip


def is_llama(c: ModelConfig) -> bool:
    return (c.pre_norm, c.norm, c.position, c.use_bias, c.activation, c.scale_embeddings) == (
        True, "rmsnorm", "rope", False, "swiglu", False,
    ) and c.local_window is None  # fmt: skip


def names(c: ModelConfig) -> dict[str, tuple[str, bool]]:
    """HF tensor name (below the model's base prefix) -> (our name, stored transposed); one table
    serves both directions. GPT-2's fused q/k/v `c_attn` is split and joined by the callers."""
    return gpt2_names(c) if is_gpt2(c) else llama_names(c)


def gpt2_names(c: ModelConfig) -> dict[str, tuple[str, bool]]:
    """GPT-2 uses Conv1D, stored [in, out] as ours: nothing is transposed."""
    names = {"wte.weight": "token_embed/embedding", "wpe.weight": "decoder/positions/table/embedding"}
    for i in range(c.num_decoder_layers):
        h, ours = f"h.{i}.", f"decoder/layer_{i}/"
        names[h + "attn.c_proj.weight"] = ours + "self_attention/out/kernel"
        names[h + "attn.c_proj.bias"] = ours + "self_attention/out/bias"
        for norm, hf_norm in (("attention_norm", "ln_1"), ("mlp_norm", "ln_2")):
            names[h + f"{hf_norm}.weight"] = ours + f"{norm}/scale"
            names[h + f"{hf_norm}.bias"] = ours + f"{norm}/bias"
        for hf_mlp, our_mlp in (("c_fc", "wi"), ("c_proj", "wo")):
            names[h + f"mlp.{hf_mlp}.weight"] = ours + f"mlp/{our_mlp}/kernel"
            names[h + f"mlp.{hf_mlp}.bias"] = ours + f"mlp/{our_mlp}/bias"
    names["ln_f.weight"], names["ln_f.bias"] = "decoder/final_norm/scale", "decoder/final_norm/bias"
    return {k: (v, False) for k, v in names.items()}


def llama_names(c: ModelConfig) -> dict[str, tuple[str, bool]]:
    """LLaMA uses torch Linear, stored [out, in]: every matrix is transposed."""
    names = {"embed_tokens.weight": ("token_embed/embedding", False)}
    for i in range(c.num_decoder_layers):
        h, ours = f"layers.{i}.", f"decoder/layer_{i}/"
        for name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj")):
            names[h + f"self_attn.{hf_name}.weight"] = (ours + f"self_attention/{name}/kernel", True)
        names[h + "input_layernorm.weight"] = (ours + "attention_norm/scale", False)
        names[h + "post_attention_layernorm.weight"] = (ours + "mlp_norm/scale", False)
        for hf_name, name in (("gate_proj", "wi_gate"), ("up_proj", "wi_up"), ("down_proj", "wo")):
            names[h + f"mlp.{hf_name}.weight"] = (ours + f"mlp/{name}/kernel", True)
    names["norm.weight"] = ("decoder/final_norm/scale", False)
    if not c.tie_embeddings:
        names["lm_head.weight"] = ("decoder/logits/kernel", True)
    return names
