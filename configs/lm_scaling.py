"""Decoder-only LMs on the English Bible for the scaling sweep (scripts/scaling_sweep.py).

A fixed token budget (num_train_steps x batch_size x max_length) for every size; the sweep sets
model.overrides.d_model / num_decoder_layers / num_heads / d_ff per point.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.task = "lm"
    c.dataset_name = "bible_lm"
    c.model.preset = "gpt2_small"
    c.model.overrides.update({"dtype": "float32", "dropout_rate": 0.0, "max_len": 128})
    c.vocab_size = 4000
    c.max_length = 128
    c.batch_size = 32
    c.num_train_steps = 250  # 250 x 32 x 128 = 1.02M tokens, about one epoch of the train split
    c.schedule = "cosine"
    c.learning_rate = 3e-3
    c.warmup_steps = 25
    c.b2 = 0.95
    c.eps = 1e-8
    c.weight_decay = 0.1
    c.clip_norm = 1.0
    c.label_smoothing = 0.0
    c.log_every = 25
    c.eval_every = 0
    c.eval_batches = 0  # the whole validation split
    c.checkpoint_every = 250
    c.keep_checkpoints = 1
    return c
