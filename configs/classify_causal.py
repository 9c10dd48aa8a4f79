"""Fine-tune a GPT-style decoder on Bible paraphrase detection: the pair "a EOS b EOS" read left to
right, the last real token's state classified (`pooling="mean"`: the mean over the tokens).

    python train.py --config=configs/classify_causal.py --workdir=runs/classify/lm_ft \
        --config.init_from=runs/classify/lm           # configs/classify_lm.py's run
"""

from configs import classify


def get_config():
    c = classify.get_config()
    c = classify.body(c, encoder=False)
    c.model.overrides.type_vocab_size = 0
    c.task = "classify_causal"
    return c
