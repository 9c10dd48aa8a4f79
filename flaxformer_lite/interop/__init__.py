"""Conversion between HuggingFace `transformers` checkpoints and flaxformer_lite models.

cfg, params = from_hf("path/to/gpt2")          # config.json + *.safetensors, no torch needed
logits = DecoderOnly(cfg).apply({"params": params}, tokens)
to_hf(params, cfg, "path/to/export")           # loadable by transformers' from_pretrained
"""

from flaxformer_lite.interop.hf import (
    SUPPORTED,
    UnsupportedCheckpointError,
    config_from_dir,
    from_hf,
    load_tokenizer,
    model_class,
    to_hf,
    vocab_orders,
)

__all__ = [
    "SUPPORTED",
    "UnsupportedCheckpointError",
    "config_from_dir",
    "from_hf",
    "load_tokenizer",
    "model_class",
    "to_hf",
    "vocab_orders",
]
