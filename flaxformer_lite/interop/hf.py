"""HuggingFace `transformers` checkpoints <-> ours: reading, writing, dispatch and tokenizers.

Each architecture's config mapping and tensor-name table (one table serves both directions) lives
in its own module: `decoder_only.py` (GPT-2, LLaMA, Mistral), `marian.py` (opus-mt), `t5.py`
(v1.0, v1.1) and `bert.py` (BertForMaskedLM). A checkpoint directory holds config.json and
model.safetensors (or shards listed in model.safetensors.index.json). Tensors are read and
written with `safetensors.numpy`, so neither torch nor transformers is needed.
"""

from __future__ import annotations

import json
import os

import numpy as np

from flaxformer_lite import files
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.interop import bert, decoder_only, marian, t5

SUPPORTED = ("gpt2", "llama", "mistral", "marian", "t5", "bert")
# Architectures described by a module: config_from_hf/config_to_hf/matches/names/VOCAB_AXES/ALIASES
# (and optionally OPTIONAL: read when present, else zero; ZERO: ours only, zero).
TABLES = {"marian": marian, "t5": t5, "bert": bert}


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
    if kind in TABLES:
        return TABLES[kind].config_from_hf(hf, _unsupported_options)
    config = decoder_only.gpt2_config if kind == "gpt2" else decoder_only.llama_config
    return config(hf, _unsupported_options)


def _unsupported_options(hf: dict, options: dict) -> None:
    bad = [f"{k}={hf[k]!r}" for k, ok in options.items() if k in hf and not ok(hf[k])]
    if bad:
        raise UnsupportedCheckpointError(
            f"{hf['model_type']} checkpoint uses options this converter cannot reproduce: {', '.join(bad)}."
        )


def config_to_hf(cfg: ModelConfig, special_ids: dict | None = None) -> dict:
    """A transformers config.json dict for a GPT-2-, LLaMA- or Marian-shaped ModelConfig.

    special_ids: {"pad_token_id": .., "eos_token_id": ..} of an imported checkpoint, to write its
    vocabulary back in its own order (default: ours, pad 0 and EOS 1).
    """
    for arch in TABLES.values():
        if arch.matches(cfg):
            return arch.config_to_hf(cfg, special_ids or {})
    hf = decoder_only.config_to_hf(cfg)
    if hf is not None:
        return hf
    raise UnsupportedCheckpointError(
        "this ModelConfig is neither GPT-2-shaped (pre-LN LayerNorm with biases, learned positions, "
        "GELU, tied, unscaled embeddings) nor LLaMA-shaped (pre-RMSNorm, RoPE, SwiGLU, no biases, "
        "unscaled embeddings, no sliding window) nor Marian-shaped (post-LN encoder-decoder with "
        "biases, concat sinusoids, logits bias, MHA) nor BERT-shaped (post-LN encoder, learned positions, "
        "token types, embedding norm, MLM logits bias) nor T5-shaped (pre-RMSNorm encoder-decoder, no "
        "biases, shared relative bias, unscaled attention); transformers has no equivalent to export to."
    )


# ------------------------------------------------------------------------------------- tensors


class _Tensors:
    """Named HF tensors; records the names asked for but absent, to report them all at once."""

    def __init__(self, tensors: dict):
        self.tensors, self.missing = tensors, []

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            self.missing.append(name)
            return np.zeros(shape, np.float32)
        x = np.asarray(self.tensors[name], np.float32)
        if x.shape != tuple(shape):
            raise UnsupportedCheckpointError(
                f"tensor {name!r} has shape {x.shape}; config.json implies {tuple(shape)}."
            )
        return x


def model_class(cfg: ModelConfig):
    """The model family a config of an imported checkpoint builds."""
    from flaxformer_lite.model.models import DecoderOnly, EncoderDecoder, EncoderOnly

    if cfg.num_encoder_layers and cfg.num_decoder_layers:
        return EncoderDecoder
    return DecoderOnly if cfg.num_decoder_layers else EncoderOnly


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter name ("decoder/layer_0/mlp/wo/kernel") -> shape, from the model itself."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from flax import traverse_util

    from flaxformer_lite.model.models import EncoderDecoder

    ids = jnp.ones((1, 1), jnp.int32)
    cls = model_class(cfg)
    init = lambda: cls(cfg).init(jax.random.key(0), *[ids] * (2 if cls is EncoderDecoder else 1))  # noqa: E731
    params = nn.unbox(jax.eval_shape(init)["params"])
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _read_tensors(path: str) -> dict:
    from safetensors.numpy import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with files.reading(index, files.replace_original("model.safetensors.index.json")), open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(
            f"no *.safetensors in {path!r}; save it with save_pretrained(..., safe_serialization=True)."
        )
    tensors = {}
    for name in names:
        with files.reading(os.path.join(path, name), files.replace_original(name)):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def _read_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path!r}: is it a transformers checkpoint directory?")
    fix = files.replace_original("config.json")
    hf = files.read_json(config_path, fix)
    if not isinstance(hf, dict):
        raise files.UnreadableFileError(
            f"{config_path} holds a JSON {type(hf).__name__}, not an object; {fix}"
        )
    return hf


def param_names(path: str) -> list[str]:
    """Our flat param names ("decoder/layer_0/mlp/wo/kernel") that `from_hf(path)` gives (config only)."""
    return list(_param_shapes(config_from_dir(path)))


def config_from_dir(path: str) -> ModelConfig:
    """The ModelConfig of a transformers checkpoint directory (its config.json only)."""
    return _config_of(path, _read_config(path))


# The sizes config.json may give (and None where transformers allows it), each at most its bound:
# the largest published models stay well inside them, and nothing is built before they are checked
# (a vocab_size of 10**12 or 10**6 layers would overflow an index or trace for hours).
_SIZE_BOUNDS = {
    **dict.fromkeys(("vocab_size", "decoder_vocab_size"), 2**22),
    **dict.fromkeys(("n_embd", "hidden_size", "d_model"), 2**16),
    **dict.fromkeys(("n_inner", "intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff"), 2**18),
    **dict.fromkeys(
        (
            "n_layer",
            "num_hidden_layers",
            "encoder_layers",
            "decoder_layers",
            "num_layers",
            "num_decoder_layers",
        ),
        2**10,
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "n_head",
            "num_attention_heads",
            "num_key_value_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "num_heads",
        ),
        2**10,
    ),  # fmt: skip
    **dict.fromkeys(("head_dim", "d_kv", "type_vocab_size", "relative_attention_num_buckets"), 2**12),
    **dict.fromkeys(
        ("n_positions", "max_position_embeddings", "relative_attention_max_distance", "sliding_window"), 2**24
    ),
}
MAX_VALUES = 2**38  # parameters plus position tables: 1 TiB in float32


def _check_sizes(config_path: str, hf: dict) -> None:
    """Refuse a size in config.json that is not a whole number in 1..its bound, naming the key."""
    for key, bound in _SIZE_BOUNDS.items():
        value = hf.get(key)
        if value is None or isinstance(value, str):  # absent, or a quoted number (_config_of names those)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise ValueError(
                f"{config_path} has {key}={value!r}, which is not a whole number from 1 to {bound:,}; "
                f"correct it, or {files.replace_original('config.json')}"
            )


def _check_total(config_path: str, cfg: ModelConfig) -> None:
    """Refuse a model whose parameters (and position tables) would pass MAX_VALUES, before building it."""
    c = cfg
    head_dim = c.head_dim or c.d_model // c.num_heads
    attention = c.d_model * head_dim * (2 * c.num_heads + 2 * (c.num_kv_heads or c.num_heads))
    mlp = c.d_model * c.d_ff * (3 if c.gated else 2)
    layers = c.num_encoder_layers + c.num_decoder_layers * (2 if c.num_encoder_layers else 1)
    vocab = c.vocab_size + (c.source_vocab_size or 0) + c.max_len + (c.type_vocab_size or 0)
    total = vocab * c.d_model + layers * (attention + mlp) + c.relative_buckets * c.num_heads
    if total > MAX_VALUES:
        raise ValueError(
            f"{config_path} describes a model of about {total:.2e} parameters (vocab_size={c.vocab_size}, "
            f"d_model={c.d_model}, d_ff={c.d_ff}, layers={c.num_encoder_layers}+{c.num_decoder_layers}, "
            f"max_len={c.max_len}), more than {MAX_VALUES:.2e}; correct it, or "
            f"{files.replace_original('config.json')}"
        )


def _config_of(path: str, hf: dict) -> ModelConfig:
    """config_from_hf, with an error from a missing key, a value of the wrong type or a size out of
    bounds naming config.json."""
    config_path = os.path.join(path, "config.json")
    _check_sizes(config_path, hf)
    try:
        cfg = config_from_hf(hf)
    except UnsupportedCheckpointError:
        raise  # says what the checkpoint uses that we cannot express
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, KeyError):
            what = f"lacks the key {e.args[0]!r}"
        else:
            quoted = [f"{k}={v!r}" for k, v in hf.items() if isinstance(v, str) and _is_number(v)]
            hint = f" (numbers written as strings: {', '.join(quoted)})" if quoted else ""
            what = f"has a value flaxformer_lite cannot use{hint}: {files.reason(e)}"
        raise ValueError(
            f"{config_path} {what}; correct it, or {files.replace_original('config.json')}"
        ) from e
    _check_total(config_path, cfg)
    return cfg


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def from_hf(path: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a transformers GPT-2 / LLaMA / Mistral / Marian checkpoint directory."""
    hf = _read_config(path)
    cfg = _config_of(path, hf)
    tensors = _read_tensors(path)
    if hf["model_type"] in TABLES:
        return cfg, _from_table(path, hf, cfg, tensors, TABLES[hf["model_type"]])
    gpt2 = hf["model_type"] == "gpt2"
    base = "transformer." if gpt2 else "model."
    prefix = base if any(k.startswith(base) for k in tensors) else ""  # absent in a bare base model
    shapes, t = _param_shapes(cfg), _Tensors(tensors)
    flat = _read(decoder_only.names(cfg), shapes, t, lambda hf_name: _full_name(hf_name, prefix))
    if gpt2:  # q, k, v fused in one Conv1D: [D, 3D] weight, [3D] bias
        D = cfg.d_model
        for i in range(cfg.num_decoder_layers):
            a, h = f"decoder/layer_{i}/self_attention/", f"{prefix}h.{i}.attn.c_attn."
            w, b = t(h + "weight", (D, 3 * D)), t(h + "bias", (3 * D,))
            for j, n in enumerate(_QKV):
                flat[a + f"{n}/kernel"] = w[:, j * D : (j + 1) * D].reshape(shapes[a + f"{n}/kernel"])
                flat[a + f"{n}/bias"] = b[j * D : (j + 1) * D].reshape(shapes[a + f"{n}/bias"])
    return cfg, _params(path, hf, flat, shapes, t)


def _params(path: str, hf: dict, flat: dict, shapes: dict, t: _Tensors) -> dict:
    from flax import traverse_util

    assert set(flat) == set(shapes), sorted(set(flat) ^ set(shapes))  # the tables cover the model
    if t.missing:
        shown = ", ".join(t.missing[:8]) + (f" and {len(t.missing) - 8} more" if len(t.missing) > 8 else "")
        raise UnsupportedCheckpointError(
            f"{path!r} lacks {len(t.missing)} tensors that a {hf['model_type']} model with its "
            f"config.json needs: {shown}."
        )
    return traverse_util.unflatten_dict({k: np.ascontiguousarray(v) for k, v in flat.items()}, sep="/")


def vocab_orders(hf: dict, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """{"source"/"target": order}, order[our id] = the checkpoint's id.

    Only Marian's vocabulary moves (`marian.vocab_orders`); others keep their ids.
    """
    cfg = cfg or config_from_hf(hf)
    orders = getattr(TABLES.get(hf["model_type"]), "vocab_orders", None)
    if orders is not None:
        return orders(hf, cfg)
    identity = np.arange(cfg.vocab_size)
    return {"source": identity, "target": identity}


def _from_table(path: str, hf: dict, cfg: ModelConfig, tensors: dict, arch) -> dict:
    """Params of a checkpoint whose architecture module has one name table for both directions."""
    for name, alternatives in arch.ALIASES.items():
        found = [a for a in alternatives if a in tensors]
        if name not in tensors and found:
            tensors[name] = tensors[found[0]]
    shapes, t = _param_shapes(cfg), _Tensors(tensors)
    optional = {k: v for k, v in getattr(arch, "OPTIONAL", {}).items() if k in tensors}
    flat = _read({**arch.names(cfg), **optional}, shapes, t)
    for name in [*getattr(arch, "ZERO", ()), *(n for n, _ in getattr(arch, "OPTIONAL", {}).values())]:
        flat.setdefault(name, np.zeros(shapes[name], np.float32))
    orders = vocab_orders(hf, cfg)
    for name, (axis, which) in arch.VOCAB_AXES.items():
        if name in flat:
            flat[name] = np.take(flat[name], orders[which], axis=axis)
    return _params(path, hf, flat, shapes, t)


def _read(table: dict, shapes: dict, t: _Tensors, full_name=lambda hf_name: hf_name) -> dict:
    """Our flat params from a name table (HF name -> (our name, transposed)), in our shapes."""
    flat = {}
    for hf_name, (name, transpose) in table.items():
        matrix = _matrix_shape(name, shapes[name])
        x = t(full_name(hf_name), matrix[::-1] if transpose else matrix)
        flat[name] = (x.T if transpose else x).reshape(shapes[name])
    return flat


def _write(table: dict, ours: dict, full_name=lambda hf_name: hf_name) -> dict:
    """HF tensors from our flat params (already in HF's matrix shapes) and a name table."""
    return {
        full_name(hf_name): ours[name].T if transpose else ours[name]
        for hf_name, (name, transpose) in table.items()
    }


def to_hf(params, cfg: ModelConfig, path: str, special_ids: dict | None = None) -> None:
    """Write config.json + model.safetensors that transformers' from_pretrained loads.

    special_ids: see `config_to_hf` (an imported model goes back with its own vocabulary order).
    """
    from flax import traverse_util

    hf = config_to_hf(cfg, special_ids)
    ours = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    if hf["model_type"] in TABLES:
        arch, orders = TABLES[hf["model_type"]], vocab_orders(hf, cfg)
        for name, (axis, which) in arch.VOCAB_AXES.items():
            if name in ours:
                ours[name] = np.take(ours[name], np.argsort(orders[which]), axis=axis)
        ours = {k: v.reshape(_matrix_shape(k, v.shape)) for k, v in ours.items()}
        out = _write(arch.names(cfg), ours)
        out.update({copy: out[source] for copy, source in getattr(arch, "EXPORT_COPIES", {}).items()})
        return _save(out, hf, path)
    ours = {k: v.reshape(_matrix_shape(k, v.shape)) for k, v in ours.items()}
    base = "transformer." if hf["model_type"] == "gpt2" else "model."
    out = _write(decoder_only.names(cfg), ours, lambda hf_name: _full_name(hf_name, base))
    if hf["model_type"] == "gpt2":
        for i in range(cfg.num_decoder_layers):
            a, h = f"decoder/layer_{i}/self_attention/", f"{base}h.{i}.attn.c_attn."
            out[h + "weight"] = np.concatenate([ours[a + f"{n}/kernel"] for n in _QKV], axis=1)
            out[h + "bias"] = np.concatenate([ours[a + f"{n}/bias"] for n in _QKV])
    _save(out, hf, path)


def _save(out: dict, hf: dict, path: str) -> None:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)


_QKV = ("query", "key", "value")


def _full_name(hf_name: str, base: str) -> str:
    return hf_name if hf_name == "lm_head.weight" else base + hf_name  # the LM head sits outside the base


def _matrix_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape transformers stores one of our tensors in (before any transpose): heads flattened."""
    if name.endswith(("query/kernel", "key/kernel", "value/kernel")):
        return (shape[0], int(np.prod(shape[1:])))  # [D, heads, H] -> [D, heads * H]
    if name.endswith(("query/bias", "key/bias", "value/bias")):
        return (int(np.prod(shape)),)
    if name.endswith("out/kernel"):
        return (int(np.prod(shape[:-1])), shape[-1])  # [N, H, D] -> [N * H, D]
    if name == "decoder/logits_bias":
        return (1, shape[0])  # Marian's final_logits_bias is [1, V]
    return tuple(shape)


def load_tokenizer(path: str):
    """The checkpoint's tokenizer: Marian's source.spm/target.spm + vocab.json, tokenizer.json
    (`tokenizers`) or tokenizer.model (SentencePiece).

    Returns an object with encode(str) -> list[int] and decode(list[int]) -> str, in our ids.
    """
    if os.path.isfile(os.path.join(path, "source.spm")):
        missing = [f for f in ("target.spm", "vocab.json") if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(
                f"{path!r} has source.spm but lacks {', '.join(missing)} (a Marian tokenizer)."
            )
        hf = _read_config(path)
        return marian.Tokenizer(path, hf, vocab_orders(hf, _config_of(path, hf)))
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        from tokenizers import Tokenizer

        with files.reading(os.path.join(path, "tokenizer.json"), files.replace_original("tokenizer.json")):
            return _HfTokenizer(Tokenizer.from_file(os.path.join(path, "tokenizer.json")))
    for name in ("tokenizer.model", "spiece.model"):  # LLaMA's, T5's (pad 0, EOS 1 as ours)
        if os.path.isfile(os.path.join(path, name)):
            import sentencepiece as spm

            with files.reading(os.path.join(path, name), files.replace_original(name)):
                return spm.SentencePieceProcessor(model_file=os.path.join(path, name))
    raise FileNotFoundError(
        f"{path!r} has no tokenizer: neither source.spm/target.spm/vocab.json (Marian), tokenizer.json, "
        "tokenizer.model nor spiece.model (T5)."
    )


class _HfTokenizer:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)
