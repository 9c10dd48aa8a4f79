"""Transformer-big (d=1024, h=16, d_ff=4096, dropout 0.3) on Bible en-de, paper hyperparameters."""

from configs import wmt_base


def get_config():
    c = wmt_base.get_config()
    c.model.preset = "transformer_big"
    return c
