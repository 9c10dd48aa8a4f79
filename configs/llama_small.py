"""LLaMA-style 125M LM (RMSNorm, SwiGLU, RoPE, GQA) on the English Bible."""

from configs import gpt2_small


def get_config():
    c = gpt2_small.get_config()
    c.model.preset = "llama_small"
    c.learning_rate = 3e-4
    return c
