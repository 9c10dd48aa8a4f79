"""Decoder-only LM on the English Bible for the equal-time comparison with nanoGPT (issue 18):
d_model 192, 4 layers, 6 heads, one epoch (250 x 32 x 128 tokens), about 5 minutes on 2 CPU cores.

    python -m benchmarks.quality_vs_nanogpt --help
"""

from configs import lm_scaling


def get_config():
    c = lm_scaling.get_config()
    c.model.overrides.update({"d_model": 192, "num_decoder_layers": 4, "num_heads": 6, "d_ff": 768})
    # The peak rate of scripts/scaling_sweep.py's rule for this size (Kaplan et al. 2020, eq. D.1).
    c.learning_rate = 1.23e-3
    return c
