"""T5 (`T5ForConditionalGeneration`: v1.0, v1.1 / flan) <-> our EncoderDecoder: config and name table.

T5 is pre-norm with RMSNorm (no bias, no mean) and no biases at all; positions are one relative
bias table per stack, held by its first layer and shared by all (`shared_relative_bias`);
attention logits are not divided by sqrt(head_dim) (`scale_attention=False`); v1.0 has a ReLU
MLP and scales the decoder output by d_model**-0.5 before the tied head (`rescale_tied_logits`);
v1.1 has a gated-GELU MLP and no rescale (an untied head in checkpoints saved before
transformers 5, which now always ties it and keeps the rescale switch as `scale_decoder_outputs`).
The vocabulary already has pad 0 and EOS 1; no ids move.
"""

from __future__ import annotations

from flaxformer_lite.config import ModelConfig

ACTIVATIONS = {"relu": "relu", "gated-gelu": "geglu", "gated-silu": "swiglu"}


def config_from_hf(hf: dict, unsupported) -> ModelConfig:
    unsupported(
        hf,
        {
            "feed_forward_proj": lambda v: v in ACTIVATIONS,
            "pad_token_id": lambda v: v == 0,
            "eos_token_id": lambda v: v == 1,
            "decoder_start_token_id": lambda v: v == 0,
        },
    )
    tied = bool(hf.get("tie_word_embeddings", True))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        num_heads=hf["num_heads"],
        head_dim=hf["d_kv"],
        d_ff=hf["d_ff"],
        num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        activation=ACTIVATIONS[hf.get("feed_forward_proj", "relu")],
        norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        pre_norm=True,
        position="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        shared_relative_bias=True,
        scale_attention=False,
        max_len=512,  # relative positions: any length; this sizes the decoding cache
        use_bias=False,
        scale_embeddings=False,
        tie_embeddings=tied,
        rescale_tied_logits=bool(hf.get("scale_decoder_outputs", tied)),
        dropout_rate=0.0,
    )


def matches(c: ModelConfig) -> bool:
    return (
        (c.pre_norm, c.norm, c.position, c.use_bias, c.shared_relative_bias, c.scale_attention)
        == (True, "rmsnorm", "relative", False, True, False)
        and c.activation in ACTIVATIONS.values()
        and c.num_kv_heads == c.num_heads
        and c.num_encoder_layers > 0
        and c.num_decoder_layers > 0
        and not c.scale_embeddings
        and not c.logits_bias
    )


def config_to_hf(c: ModelConfig, special_ids: dict) -> dict:
    """config.json; the vocabulary keeps its ids, so `special_ids` are not needed."""
    return {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_kv": c.head_dim,
        "d_ff": c.d_ff,
        "num_heads": c.num_heads,
        "num_layers": c.num_encoder_layers,
        "num_decoder_layers": c.num_decoder_layers,
        "feed_forward_proj": {v: k for k, v in ACTIVATIONS.items()}[c.activation],
        "layer_norm_epsilon": c.norm_eps,
        "relative_attention_num_buckets": c.relative_buckets,
        "relative_attention_max_distance": c.relative_max_distance,
        "tie_word_embeddings": c.tie_embeddings,
        "scale_decoder_outputs": c.rescale_tied_logits,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "is_encoder_decoder": True,
    }


def names(c: ModelConfig) -> dict[str, tuple[str, bool]]:
    """HF tensor name -> (our name, stored transposed); torch Linear stores [out, in]."""
    names = {"shared.weight": ("token_embed/embedding", False)}
    if not c.tie_embeddings:
        names["lm_head.weight"] = ("decoder/logits/kernel", True)
    mlp = {"wi_0": "wi_gate", "wi_1": "wi_up", "wo": "wo"} if c.gated else {"wi": "wi", "wo": "wo"}
    stacks = {
        "encoder": (c.num_encoder_layers, [("SelfAttention", "self_attention", "attention_norm")]),
        "decoder": (c.num_decoder_layers, [("SelfAttention", "self_attention", "attention_norm"),
                                           ("EncDecAttention", "cross_attention", "cross_attention_norm")]),
    }  # fmt: skip
    for stack, (layers, attentions) in stacks.items():
        names[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
            f"{stack}/relative_bias",
            False,
        )
        names[f"{stack}.final_layer_norm.weight"] = (f"{stack}/final_norm/scale", False)
        for i in range(layers):
            h, ours = f"{stack}.block.{i}.layer.", f"{stack}/layer_{i}/"
            for j, (hf_attention, attention, norm) in enumerate(attentions):
                for hf_proj, proj in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
                    names[h + f"{j}.{hf_attention}.{hf_proj}.weight"] = (
                        ours + f"{attention}/{proj}/kernel",
                        True,
                    )
                names[h + f"{j}.layer_norm.weight"] = (ours + f"{norm}/scale", False)
            j = len(attentions)
            for hf_w, w in mlp.items():
                names[h + f"{j}.DenseReluDense.{hf_w}.weight"] = (ours + f"mlp/{w}/kernel", True)
            names[h + f"{j}.layer_norm.weight"] = (ours + "mlp_norm/scale", False)
    return names


VOCAB_AXES: dict = {}  # no ids move
ALIASES = {"shared.weight": ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
