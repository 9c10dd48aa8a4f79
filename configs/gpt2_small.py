"""GPT-2 124M language model on the English Bible: AdamW, linear warmup + cosine decay."""

from configs import default


def get_config():
    c = default.get_config()
    c.task = "lm"
    c.dataset_name = "bible_lm"
    c.model.preset = "gpt2_small"
    c.model.overrides.dtype = "bfloat16"  # vocab_size always comes from the tokenizer
    c.vocab_size = 16_000
    c.max_length = 1024
    c.batch_size = 32
    c.schedule = "cosine"
    c.learning_rate = 6e-4
    c.warmup_steps = 700
    c.num_train_steps = 20_000
    c.b2 = 0.95
    c.eps = 1e-8
    c.weight_decay = 0.1
    c.clip_norm = 1.0
    c.label_smoothing = 0.0
    return c
