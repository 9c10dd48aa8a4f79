"""A tiny decoder-only LM with Transformer-XL memory on the fixture's Bible chapters, for tests.

Also usable as a script config: python train.py --config=tests/memory_config.py --workdir=...
(set --config.data_dir to share a prepared dataset between runs).
"""

from configs import long_doc
from tests.tiny_config import FIXTURE


def get_config():
    c = long_doc.get_config()
    c.model.overrides.update(
        {
            "d_model": 32,
            "num_heads": 4,
            "d_ff": 64,
            "num_decoder_layers": 2,
            "position": "rope",
            "memory_length": 16,  # the previous segment (max_length 16)
            "dropout_rate": 0.1,
        }
    )
    c.update(
        db_path=FIXTURE, vocab_size=400, max_length=16, batch_size=8, num_train_steps=12,
        checkpoint_every=4, schedule="constant", learning_rate=3e-3, log_every=1, eval_every=0,
        eval_batches=1, async_checkpoints=False, long_document_strides="",
    )  # fmt: skip
    return c
