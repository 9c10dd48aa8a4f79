"""Marian (`MarianMTModel`, the opus-mt family) <-> our EncoderDecoder: config and the name table.

Marian is a post-LN encoder-decoder with biases everywhere, LayerNorm eps 1e-5, sinusoidal positions
with the sines in the first half of the channels and the cosines in the second ("concat"), token
embeddings scaled by sqrt(d_model) when `scale_embedding`, the output tied to the decoder's
embedding, and a `final_logits_bias`. Its vocabulary puts padding last and EOS at 0, while ours
has pad 0 and EOS 1 (`flaxformer_lite.ids`): `vocab_order` permutes the vocabulary rows on the
way in and back on the way out, and the tokenizer (`interop.load_tokenizer`) maps ids the same way.
"""

from __future__ import annotations

import numpy as np

from flaxformer_lite.config import ModelConfig
from flaxformer_lite.ids import EOS_ID, PAD_ID

ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh"}
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which Marian uses


def config_from_hf(hf: dict, unsupported) -> ModelConfig:
    """Our ModelConfig for a Marian config.json dict; `unsupported(hf, {key: ok})` raises on a bad option."""
    unsupported(
        hf,
        {
            "activation_function": lambda v: v in ACTIVATIONS,
            "decoder_attention_heads": lambda v: v == hf["encoder_attention_heads"],
            "decoder_ffn_dim": lambda v: v == hf["encoder_ffn_dim"],
            "decoder_start_token_id": lambda v: v == hf["pad_token_id"],
            "normalize_before": lambda v: not v,
            "add_final_layer_norm": lambda v: not v,
            "normalize_embedding": lambda v: not v,
            "static_position_embeddings": lambda v: v,
        },
    )
    shared = hf.get("share_encoder_decoder_embeddings", True)
    target_vocab = hf["vocab_size"] if shared else hf.get("decoder_vocab_size") or hf["vocab_size"]
    return ModelConfig(
        vocab_size=target_vocab,
        source_vocab_size=None if shared else hf["vocab_size"],
        d_model=hf["d_model"],
        num_heads=hf["encoder_attention_heads"],
        d_ff=hf["encoder_ffn_dim"],
        num_encoder_layers=hf["encoder_layers"],
        num_decoder_layers=hf["decoder_layers"],
        activation=ACTIVATIONS[hf.get("activation_function", "swish")],
        norm_eps=LAYER_NORM_EPS,
        pre_norm=False,
        position="sinusoidal",
        sinusoid_layout="concat",
        max_len=hf.get("max_position_embeddings", 512),
        scale_embeddings=bool(hf.get("scale_embedding", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        logits_bias=True,
        dropout_rate=0.0,
    )


def matches(c: ModelConfig) -> bool:
    """Whether transformers' Marian can express this ModelConfig."""
    return (
        (c.pre_norm, c.norm, c.position, c.sinusoid_layout, c.use_bias, c.logits_bias)
        == (False, "layernorm", "sinusoidal", "concat", True, True)
        and c.activation in ACTIVATIONS.values()
        and c.num_kv_heads == c.num_heads
        and c.head_dim * c.num_heads == c.d_model
        and c.num_encoder_layers > 0
        and c.local_window is None
    )


def config_to_hf(c: ModelConfig, special_ids: dict) -> dict:
    """config.json; `special_ids` (pad_token_id, eos_token_id) default to ours (pad 0, EOS 1)."""
    pad_id = special_ids.get("pad_token_id", PAD_ID)
    eos_id = special_ids.get("eos_token_id", EOS_ID)
    shared = c.source_vocab_size is None
    return {
        "model_type": "marian",
        "architectures": ["MarianMTModel"],
        "vocab_size": c.vocab_size if shared else c.source_vocab_size,
        "decoder_vocab_size": c.vocab_size,
        "share_encoder_decoder_embeddings": shared,
        "d_model": c.d_model,
        "encoder_layers": c.num_encoder_layers,
        "decoder_layers": c.num_decoder_layers,
        "encoder_attention_heads": c.num_heads,
        "decoder_attention_heads": c.num_heads,
        "encoder_ffn_dim": c.d_ff,
        "decoder_ffn_dim": c.d_ff,
        "activation_function": {"silu": "swish", "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}[
            c.activation
        ],
        "max_position_embeddings": c.max_len,
        "scale_embedding": c.scale_embeddings,
        "tie_word_embeddings": c.tie_embeddings,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
        "forced_eos_token_id": eos_id,
        "decoder_start_token_id": pad_id,
        "is_encoder_decoder": True,
    }


def names(c: ModelConfig) -> dict[str, tuple[str, bool]]:
    """HF tensor name -> (our name, stored transposed). torch Linear stores [out, in]: transposed."""
    shared = c.source_vocab_size is None
    names = {"final_logits_bias": ("decoder/logits_bias", False)}
    if shared:
        names["model.shared.weight"] = ("token_embed/embedding", False)
    else:
        names["model.encoder.embed_tokens.weight"] = ("source_embed/embedding", False)
        names["model.decoder.embed_tokens.weight"] = ("token_embed/embedding", False)
    if not c.tie_embeddings:
        names["lm_head.weight"] = ("decoder/logits/kernel", True)
    attention = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "out_proj": "out"}
    decoder_blocks = {"self_attn": "self_attention", "encoder_attn": "cross_attention"}
    stacks = (
        ("encoder", c.num_encoder_layers, {"self_attn": "self_attention"}),
        ("decoder", c.num_decoder_layers, decoder_blocks),
    )
    for stack, layers, blocks in stacks:
        for i in range(layers):
            h, ours = f"model.{stack}.layers.{i}.", f"{stack}/layer_{i}/"
            for hf_block, block in blocks.items():
                for hf_proj, proj in attention.items():
                    names[h + f"{hf_block}.{hf_proj}.weight"] = (ours + f"{block}/{proj}/kernel", True)
                    names[h + f"{hf_block}.{hf_proj}.bias"] = (ours + f"{block}/{proj}/bias", False)
                norm = "attention_norm" if hf_block == "self_attn" else "cross_attention_norm"
                names[h + f"{hf_block}_layer_norm.weight"] = (ours + f"{norm}/scale", False)
                names[h + f"{hf_block}_layer_norm.bias"] = (ours + f"{norm}/bias", False)
            for hf_fc, fc in (("fc1", "wi"), ("fc2", "wo")):
                names[h + f"{hf_fc}.weight"] = (ours + f"mlp/{fc}/kernel", True)
                names[h + f"{hf_fc}.bias"] = (ours + f"mlp/{fc}/bias", False)
            names[h + "final_layer_norm.weight"] = (ours + "mlp_norm/scale", False)
            names[h + "final_layer_norm.bias"] = (ours + "mlp_norm/bias", False)
    return names


# The tensors whose rows (after any transpose: this axis of ours) are vocabulary ids, and which vocabulary.
VOCAB_AXES = {
    "token_embed/embedding": (0, "target"),
    "source_embed/embedding": (0, "source"),
    "decoder/logits_bias": (0, "target"),
    "decoder/logits/kernel": (1, "target"),
}

# Older exports hold the shared embedding under these names (transformers 5 writes model.shared only).
ALIASES = {
    "model.shared.weight": ("model.decoder.embed_tokens.weight", "model.encoder.embed_tokens.weight"),
    "model.decoder.embed_tokens.weight": ("model.shared.weight",),
    "model.encoder.embed_tokens.weight": ("model.shared.weight",),
}


def vocab_orders(hf: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """{"source"/"target": `vocab_order`} for the checkpoint's (one or two) vocabularies."""
    pad, eos = hf.get("pad_token_id", PAD_ID), hf.get("eos_token_id", EOS_ID)
    target = vocab_order(cfg.vocab_size, pad, eos)
    source = target if cfg.source_vocab_size is None else vocab_order(cfg.source_vocab_size, pad, eos)
    return {"source": source, "target": target}


def vocab_order(size: int, pad_id: int, eos_id: int) -> np.ndarray:
    """order[our id] = HF id: HF's pad and EOS move to our PAD_ID (0) and EOS_ID (1), others keep
    their relative order. Identity when the checkpoint already has pad 0 and EOS 1."""
    assert (PAD_ID, EOS_ID) == (0, 1)
    rest = [i for i in range(size) if i not in (pad_id, eos_id)]
    return np.asarray([pad_id, eos_id, *rest], np.int64)


class Tokenizer:
    """A Marian directory's tokenizer: source.spm / target.spm pieces -> ids through vocab.json
    (target_vocab.json for a separate target vocabulary), then into our vocabulary order.

    encode (sources) / encode_targets / decode (targets) follow transformers' MarianTokenizer,
    without its optional Moses punctuation normalizer and language-code handling.
    """

    def __init__(self, path: str, hf: dict, orders: dict[str, np.ndarray]):
        import os

        import sentencepiece as spm

        from flaxformer_lite import files

        def vocab(name):
            return files.read_json(os.path.join(path, name), files.replace_original(name))

        def model(name):
            with files.reading(os.path.join(path, name), files.replace_original(name)):
                return spm.SentencePieceProcessor(model_file=os.path.join(path, name))

        self.spm = {side: model(f"{side}.spm") for side in ("source", "target")}
        source_vocab = vocab("vocab.json")
        separate = os.path.isfile(os.path.join(path, "target_vocab.json"))
        target_vocab = vocab("target_vocab.json") if separate else source_vocab
        self.vocab = {"source": source_vocab, "target": target_vocab}
        self.to_ours = {side: np.argsort(orders[side]) for side in ("source", "target")}
        self.pieces = {v: k for k, v in target_vocab.items()}  # target HF id -> piece
        self.order = orders["target"]
        self.special = {hf.get("pad_token_id"), hf.get("eos_token_id"), target_vocab.get("<unk>")}
        # As transformers does: a shared vocabulary decodes with the *source* model's pieces.
        self.decoder_spm = self.spm["target" if separate else "source"]
        self.size = max(len(o) for o in orders.values())

    def _encode(self, text: str, side: str) -> list[int]:
        vocab, unk = self.vocab[side], self.vocab[side]["<unk>"]
        hf_ids = [vocab.get(p, unk) for p in self.spm[side].encode(text, out_type=str)]
        return [int(i) for i in self.to_ours[side][hf_ids]] if hf_ids else []

    def encode(self, text: str) -> list[int]:
        return self._encode(text, "source")

    def encode_targets(self, text: str) -> list[int]:
        return self._encode(text, "target")

    def decode(self, ids) -> str:
        hf_ids = [int(self.order[i]) for i in ids]
        pieces = [self.pieces[i] for i in hf_ids if i not in self.special and i in self.pieces]
        return self.decoder_spm.decode_pieces(pieces).replace("\u2581", " ").strip()

    def get_piece_size(self) -> int:
        return self.size

    def is_byte(self, i: int) -> bool:
        return False  # pieces come from vocab.json; unknown ones become <unk>
