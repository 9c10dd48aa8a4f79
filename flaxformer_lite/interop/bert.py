"""BERT (`BertForMaskedLM`) <-> our EncoderOnly: config and the name table.

BERT is post-LN with biases everywhere: word + learned position + token-type embeddings, a
LayerNorm on their sum, exact GELU, and an MLM head (dense, GELU, LayerNorm, the tied word
embedding, an output bias). Its vocabulary keeps [PAD] at 0, as ours does; no ids move.
BertForMaskedLM has no pooler: our classification head (pooler, classifier) is left at zero,
unless the checkpoint has `bert.pooler.dense` (BertForPreTraining), which is then read.
"""

from __future__ import annotations

from flaxformer_lite.config import ModelConfig

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu", "silu": "silu"}


def config_from_hf(hf: dict, unsupported) -> ModelConfig:
    unsupported(
        hf,
        {
            "hidden_act": lambda v: v in ACTIVATIONS,
            "position_embedding_type": lambda v: v == "absolute",
            "is_decoder": lambda v: not v,
            "add_cross_attention": lambda v: not v,
        },
    )
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        num_encoder_layers=hf["num_hidden_layers"],
        num_decoder_layers=0,
        activation=ACTIVATIONS[hf.get("hidden_act", "gelu")],
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        pre_norm=False,
        position="learned",
        max_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        embedding_norm=True,
        scale_embeddings=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        logits_bias=True,
        dropout_rate=0.0,
    )


def matches(c: ModelConfig) -> bool:
    return (
        (c.num_decoder_layers, c.pre_norm, c.norm, c.position, c.use_bias, c.logits_bias, c.embedding_norm)
        == (0, False, "layernorm", "learned", True, True, True)
        and c.type_vocab_size > 0
        and not c.scale_embeddings
        and c.activation in ACTIVATIONS.values()
        and c.num_kv_heads == c.num_heads
        and c.head_dim * c.num_heads == c.d_model
    )


def config_to_hf(c: ModelConfig, special_ids: dict) -> dict:
    """config.json; the vocabulary keeps its ids, so `special_ids` are not needed."""
    return {
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.num_encoder_layers,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.d_ff,
        "hidden_act": {v: k for k, v in ACTIVATIONS.items()}[c.activation],
        "max_position_embeddings": c.max_len,
        "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "pad_token_id": 0,
    }


def names(c: ModelConfig) -> dict[str, tuple[str, bool]]:
    """HF tensor name -> (our name, stored transposed); torch Linear stores [out, in]."""
    e = "bert.embeddings."
    names = {
        e + "word_embeddings.weight": ("token_embed/embedding", False),
        e + "position_embeddings.weight": ("encoder/positions/table/embedding", False),
        e + "token_type_embeddings.weight": ("encoder/positions/token_types/embedding", False),
        e + "LayerNorm.weight": ("encoder/positions/embedding_norm/scale", False),
        e + "LayerNorm.bias": ("encoder/positions/embedding_norm/bias", False),
        "cls.predictions.transform.dense.weight": ("mlm_dense/kernel", True),
        "cls.predictions.transform.dense.bias": ("mlm_dense/bias", False),
        "cls.predictions.transform.LayerNorm.weight": ("mlm_norm/scale", False),
        "cls.predictions.transform.LayerNorm.bias": ("mlm_norm/bias", False),
        "cls.predictions.decoder.bias": ("logits_bias", False),  # what the forward pass adds
    }
    if not c.tie_embeddings:
        names["cls.predictions.decoder.weight"] = ("mlm_logits/kernel", True)
    for i in range(c.num_encoder_layers):
        h, ours = f"bert.encoder.layer.{i}.", f"encoder/layer_{i}/"
        parts = {
            "attention.self.query": "self_attention/query",
            "attention.self.key": "self_attention/key",
            "attention.self.value": "self_attention/value",
            "attention.output.dense": "self_attention/out",
            "intermediate.dense": "mlp/wi",
            "output.dense": "mlp/wo",
        }
        for hf_part, part in parts.items():
            names[h + hf_part + ".weight"] = (ours + part + "/kernel", True)
            names[h + hf_part + ".bias"] = (ours + part + "/bias", False)
        for hf_norm, norm in (
            ("attention.output.LayerNorm", "attention_norm"),
            ("output.LayerNorm", "mlp_norm"),
        ):
            names[h + hf_norm + ".weight"] = (ours + norm + "/scale", False)
            names[h + hf_norm + ".bias"] = (ours + norm + "/bias", False)
    return names


# Read when present (BertForPreTraining has a pooler), else zero: BertForMaskedLM has none.
OPTIONAL = {
    "bert.pooler.dense.weight": ("pooler/kernel", True),
    "bert.pooler.dense.bias": ("pooler/bias", False),
}
ZERO = ("classifier/kernel", "classifier/bias")  # no transformers counterpart: fine-tuning sets it
VOCAB_AXES: dict = {}  # no ids move
# A tied model saves the output bias once, as either name; export writes both.
ALIASES = {"cls.predictions.decoder.bias": ("cls.predictions.bias",)}
EXPORT_COPIES = {"cls.predictions.bias": "cls.predictions.decoder.bias"}
