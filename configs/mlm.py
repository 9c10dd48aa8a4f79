"""BERT-style encoder-only masked LM (15% of tokens masked) on the English Bible."""

from configs import default


def get_config():
    c = default.get_config()
    c.task = "mlm"
    c.dataset_name = "bible_lm"
    c.model.preset = "transformer_base"
    c.model.overrides.update({"dtype": "bfloat16", "pre_norm": True, "position": "learned"})
    c.vocab_size = 16_000
    c.schedule = "cosine"
    c.learning_rate = 3e-4
    c.warmup_steps = 1000
    c.num_train_steps = 20_000
    c.label_smoothing = 0.0
    c.weight_decay = 0.01
    c.clip_norm = 1.0
    return c
