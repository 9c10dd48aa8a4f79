"""GPT-2 and LLaMA-family (LLaMA, Mistral) checkpoints of HuggingFace `transformers` <-> ours.

A checkpoint directory holds config.json and model.safetensors (or shards listed in
model.safetensors.index.json). Tensors are read and written with `safetensors.numpy`, so neither
torch nor transformers is needed. Layout notes:
- GPT-2 uses Conv1D, weights stored [in, out]; q, k, v are one fused [d, 3d] `c_attn`.
- LLaMA uses torch Linear, weights stored [out, in]; its checkpoints already use the half-split
  ("rotate_half") RoPE layout that `ops.apply_rope` implements, so no permutation is needed.
"""

from __future__ import annotations

import json
import os

import numpy as np

from flaxformer_lite.config import ModelConfig

SUPPORTED = ("gpt2", "llama", "mistral")
_GPT2_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


class UnsupportedCheckpointError(ValueError):
    """A checkpoint this converter cannot express exactly (architecture, option, or missing tensors)."""


# ------------------------------------------------------------------------------------- config


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig for a transformers config.json dict (dropout off: pretrained weights)."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise UnsupportedCheckpointError(
            f"model_type {kind!r} (architectures {hf.get('architectures')}) is not supported; "
            f"supported: {', '.join(SUPPORTED)}."
        )
    return _gpt2_config(hf) if kind == "gpt2" else _llama_config(hf)


def _unsupported_options(hf: dict, options: dict) -> None:
    bad = [f"{k}={hf[k]!r}" for k, ok in options.items() if k in hf and not ok(hf[k])]
    if bad:
        raise UnsupportedCheckpointError(
            f"{hf['model_type']} checkpoint uses options this converter cannot reproduce: {', '.join(bad)}."
        )


def _gpt2_config(hf: dict) -> ModelConfig:
    _unsupported_options(
        hf,
        {
            "activation_function": lambda v: v in _GPT2_ACTIVATIONS,
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
        activation=_GPT2_ACTIVATIONS[hf.get("activation_function", "gelu_new")],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        pre_norm=True,
        position="learned",
        max_len=hf["n_positions"],
        scale_embeddings=False,
        dropout_rate=0.0,
    )


def _default_rope(v) -> bool:
    return v is None or v.get("rope_type", v.get("type", "default")) == "default"


def _llama_config(hf: dict) -> ModelConfig:
    _unsupported_options(
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


def config_to_hf(cfg: ModelConfig) -> dict:
    """A transformers config.json dict for a GPT-2- or LLaMA-shaped ModelConfig."""
    if _is_gpt2(cfg):
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_head": cfg.num_heads,
            "n_inner": cfg.d_ff,
            "n_layer": cfg.num_decoder_layers,
            "n_positions": cfg.max_len,
            "activation_function": {v: k for k, v in _GPT2_ACTIVATIONS.items()}[cfg.activation],
            "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": True,
        }
    if _is_llama(cfg):
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
    raise UnsupportedCheckpointError(
        "this ModelConfig is neither GPT-2-shaped (pre-LN LayerNorm with biases, learned positions, "
        "GELU, tied, unscaled embeddings) nor LLaMA-shaped (pre-RMSNorm, RoPE, SwiGLU, no biases, "
        "unscaled embeddings, no sliding window); transformers has no equivalent to export to."
    )


def _is_gpt2(c: ModelConfig) -> bool:
    return (c.pre_norm, c.norm, c.position, c.use_bias, c.tie_embeddings, c.scale_embeddings) == (
        True, "layernorm", "learned", True, True, False,
    ) and c.activation in _GPT2_ACTIVATIONS.values() and c.head_dim * c.num_heads == c.d_model  # fmt: skip


def _is_llama(c: ModelConfig) -> bool:
    return (c.pre_norm, c.norm, c.position, c.use_bias, c.activation, c.scale_embeddings) == (
        True, "rmsnorm", "rope", False, "swiglu", False,
    ) and c.local_window is None  # fmt: skip


# ------------------------------------------------------------------------------------- tensors


class _Tensors:
    """Named HF tensors; records the names asked for but absent, to report them all at once."""

    def __init__(self, tensors: dict, prefix: str):
        self.tensors, self.prefix, self.missing = tensors, prefix, []

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = self.prefix + name
        if full not in self.tensors:
            self.missing.append(full)
            return np.zeros(shape, np.float32)
        x = np.asarray(self.tensors[full], np.float32)
        if x.shape != shape:
            raise UnsupportedCheckpointError(
                f"tensor {full!r} has shape {x.shape}; config.json implies {shape}."
            )
        return x


def _gpt2_params(t: _Tensors, c: ModelConfig) -> dict:
    D, N, H, F = c.d_model, c.num_heads, c.head_dim, c.d_ff
    p = {"token_embed/embedding": t("wte.weight", (c.vocab_size, D))}
    p["decoder/positions/table/embedding"] = t("wpe.weight", (c.max_len, D))
    for i in range(c.num_decoder_layers):
        h, ours = f"h.{i}.", f"decoder/layer_{i}/"
        qkv_w, qkv_b = t(h + "attn.c_attn.weight", (D, 3 * D)), t(h + "attn.c_attn.bias", (3 * D,))
        for j, name in enumerate(("query", "key", "value")):
            p[ours + f"self_attention/{name}/kernel"] = qkv_w[:, j * D : (j + 1) * D].reshape(D, N, H)
            p[ours + f"self_attention/{name}/bias"] = qkv_b[j * D : (j + 1) * D].reshape(N, H)
        p[ours + "self_attention/out/kernel"] = t(h + "attn.c_proj.weight", (D, D)).reshape(N, H, D)
        p[ours + "self_attention/out/bias"] = t(h + "attn.c_proj.bias", (D,))
        for norm, hf_norm in (("attention_norm", "ln_1"), ("mlp_norm", "ln_2")):
            p[ours + f"{norm}/scale"] = t(h + f"{hf_norm}.weight", (D,))
            p[ours + f"{norm}/bias"] = t(h + f"{hf_norm}.bias", (D,))
        p[ours + "mlp/wi/kernel"] = t(h + "mlp.c_fc.weight", (D, F))
        p[ours + "mlp/wi/bias"] = t(h + "mlp.c_fc.bias", (F,))
        p[ours + "mlp/wo/kernel"] = t(h + "mlp.c_proj.weight", (F, D))
        p[ours + "mlp/wo/bias"] = t(h + "mlp.c_proj.bias", (D,))
    p["decoder/final_norm/scale"] = t("ln_f.weight", (D,))
    p["decoder/final_norm/bias"] = t("ln_f.bias", (D,))
    return p


def _llama_params(t: _Tensors, c: ModelConfig) -> dict:
    D, N, K, H, F = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.d_ff
    p = {"token_embed/embedding": t("embed_tokens.weight", (c.vocab_size, D))}
    for i in range(c.num_decoder_layers):
        h, ours = f"layers.{i}.", f"decoder/layer_{i}/"
        for name, hf_name, heads in (("query", "q_proj", N), ("key", "k_proj", K), ("value", "v_proj", K)):
            w = t(h + f"self_attn.{hf_name}.weight", (heads * H, D))  # [out, in]
            p[ours + f"self_attention/{name}/kernel"] = w.T.reshape(D, heads, H)
        p[ours + "self_attention/out/kernel"] = t(h + "self_attn.o_proj.weight", (D, N * H)).T.reshape(
            N, H, D
        )
        p[ours + "attention_norm/scale"] = t(h + "input_layernorm.weight", (D,))
        p[ours + "mlp_norm/scale"] = t(h + "post_attention_layernorm.weight", (D,))
        p[ours + "mlp/wi_gate/kernel"] = t(h + "mlp.gate_proj.weight", (F, D)).T
        p[ours + "mlp/wi_up/kernel"] = t(h + "mlp.up_proj.weight", (F, D)).T
        p[ours + "mlp/wo/kernel"] = t(h + "mlp.down_proj.weight", (D, F)).T
    p["decoder/final_norm/scale"] = t("norm.weight", (D,))
    return p


def _read_tensors(path: str) -> dict:
    from safetensors.numpy import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {path!r}; save it with save_pretrained(..., safe_serialization=True)."
        )
    tensors = {}
    for f in files:
        tensors.update(load_file(os.path.join(path, f)))
    return tensors


def from_hf(path: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a transformers GPT-2 / LLaMA / Mistral checkpoint directory."""
    from flax import traverse_util

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path!r}: is it a transformers checkpoint directory?")
    hf = json.load(open(config_path))
    cfg = config_from_hf(hf)
    tensors = _read_tensors(path)
    gpt2 = hf["model_type"] == "gpt2"
    base = "transformer." if gpt2 else "model."
    prefix = base if any(k.startswith(base) for k in tensors) else ""
    t = _Tensors(tensors, prefix)
    flat = _gpt2_params(t, cfg) if gpt2 else _llama_params(t, cfg)
    if not gpt2 and not cfg.tie_embeddings:
        root = _Tensors(tensors, "")
        root.missing = t.missing  # one list of everything absent
        flat["decoder/logits/kernel"] = root("lm_head.weight", (cfg.vocab_size, cfg.d_model)).T
    if t.missing:
        shown = ", ".join(t.missing[:8]) + (f" and {len(t.missing) - 8} more" if len(t.missing) > 8 else "")
        raise UnsupportedCheckpointError(
            f"{path!r} lacks {len(t.missing)} tensors that a {hf['model_type']} model with its "
            f"config.json needs: {shown}."
        )
    params = traverse_util.unflatten_dict({k: np.ascontiguousarray(v) for k, v in flat.items()}, sep="/")
    return cfg, params


def to_hf(params, cfg: ModelConfig, path: str) -> None:
    """Write config.json + model.safetensors that transformers' from_pretrained loads."""
    from flax import traverse_util
    from safetensors.numpy import save_file

    hf = config_to_hf(cfg)
    ours = {
        k: _as_matrix(k, np.asarray(v, np.float32))
        for k, v in traverse_util.flatten_dict(params, sep="/").items()
    }
    if hf["model_type"] == "gpt2":
        out = {"transformer." + hf_name: ours[name] for hf_name, name in _gpt2_names(cfg).items()}
        for i in range(cfg.num_decoder_layers):
            a = f"decoder/layer_{i}/self_attention/"
            names = ("query", "key", "value")
            out[f"transformer.h.{i}.attn.c_attn.weight"] = np.concatenate(
                [ours[a + f"{n}/kernel"] for n in names], 1
            )
            out[f"transformer.h.{i}.attn.c_attn.bias"] = np.concatenate(
                [ours[a + f"{n}/bias"] for n in names]
            )
    else:
        out = {
            hf_name: ours[name].T if transpose else ours[name]
            for hf_name, (name, transpose) in _llama_names(cfg).items()
        }
    os.makedirs(path, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)


def _gpt2_names(c: ModelConfig) -> dict[str, str]:
    """HF name -> our name for every GPT-2 tensor except the fused c_attn."""
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
    return names


def _as_matrix(name: str, x: np.ndarray) -> np.ndarray:
    """Our attention tensors flattened over heads, as transformers stores them ([in, out] still)."""
    if name.endswith(("query/kernel", "key/kernel", "value/kernel")):
        return x.reshape(x.shape[0], -1)  # [D, heads, H] -> [D, heads * H]
    if name.endswith(("query/bias", "key/bias", "value/bias")):
        return x.reshape(-1)
    if name.endswith("out/kernel"):
        return x.reshape(-1, x.shape[-1])  # [N, H, D] -> [N * H, D]
    return x


def _llama_names(c: ModelConfig) -> dict[str, tuple[str, bool]]:
    """HF name -> (our name, transposed) for every LLaMA tensor."""
    names = {"model.embed_tokens.weight": ("token_embed/embedding", False)}
    for i in range(c.num_decoder_layers):
        h, ours = f"model.layers.{i}.", f"decoder/layer_{i}/"
        for name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj")):
            names[h + f"self_attn.{hf_name}.weight"] = (ours + f"self_attention/{name}/kernel", True)
        names[h + "input_layernorm.weight"] = (ours + "attention_norm/scale", False)
        names[h + "post_attention_layernorm.weight"] = (ours + "mlp_norm/scale", False)
        for hf_name, name in (("gate_proj", "wi_gate"), ("up_proj", "wi_up"), ("down_proj", "wo")):
            names[h + f"mlp.{hf_name}.weight"] = (ours + f"mlp/{name}/kernel", True)
    names["model.norm.weight"] = ("decoder/final_norm/scale", False)
    if not c.tie_embeddings:
        names["lm_head.weight"] = ("decoder/logits/kernel", True)
    return names


def load_tokenizer(path: str):
    """The checkpoint's tokenizer: tokenizer.json (`tokenizers`) or tokenizer.model (SentencePiece).

    Returns an object with encode(str) -> list[int] and decode(list[int]) -> str.
    """
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        from tokenizers import Tokenizer

        return _HfTokenizer(Tokenizer.from_file(os.path.join(path, "tokenizer.json")))
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    raise FileNotFoundError(f"{path!r} has neither tokenizer.json nor tokenizer.model.")


class _HfTokenizer:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)
