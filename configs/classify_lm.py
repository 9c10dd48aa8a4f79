"""Pretrain the decoder of configs/classify_causal.py: a GPT-style LM on the English Bible's
training books (same body size and budget as configs/classify_mlm.py).

    python train.py --config=configs/classify_lm.py --workdir=runs/classify/lm
"""

from configs import classify, classify_mlm


def get_config():
    c = classify_mlm.get_config()
    c = classify.body(c, encoder=False)
    c.model.overrides.type_vocab_size = 0
    c.task = "lm"
    return c
