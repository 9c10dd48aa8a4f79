"""Transformer-base (Vaswani et al. 2017) on Bible en-de: Adam(0.9, 0.98, 1e-9), Noam 4000, smoothing 0.1."""

from configs import default


def get_config():
    c = default.get_config()
    c.model.preset = "transformer_base"
    c.vocab_size = 32_000
    c.batch_size = 256
    c.max_length = 128
    return c
