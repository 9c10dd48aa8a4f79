"""A tiny translation run on the committed Bible fixture, for tests.

Also usable as a script config: python train.py --config=tests/tiny_config.py --workdir=... (set
--config.data_dir to share a prepared dataset between runs).
"""

import os

from configs import quickstart

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "bible_small.db")


def get_config():
    c = quickstart.get_config()
    c.db_path = FIXTURE
    c.model.overrides.update(
        {
            "d_model": 32,
            "num_heads": 4,
            "d_ff": 64,
            "num_encoder_layers": 1,
            "num_decoder_layers": 1,
            "dropout_rate": 0.1,
            "pre_norm": True,
        }
    )
    c.vocab_size = 400
    c.max_length = 32
    c.batch_size = 8
    c.num_train_steps = 12
    c.schedule = "constant"  # the same schedule whatever num_train_steps is (for resume tests)
    c.learning_rate = 3e-3
    c.log_every = 1
    c.eval_every = 0
    c.eval_batches = 2
    c.bleu_examples = 8
    c.max_decode_length = 8
    c.checkpoint_every = 3
    c.async_checkpoints = False
    return c
