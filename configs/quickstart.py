"""CPU quickstart: a small translation model on Bible en-de in about 10 minutes on 2 cores, then BLEU.

Chosen on validation BLEU/perplexity within the same wall time (docs/results/quickstart/tuning.md):
the model sees about a third of an epoch, so dropout only slows it down (0.1 -> 0.0), and it takes
a higher peak rate (2e-3 -> 5e-3) and the steps the faster tokenizer training frees (1000 -> 1200).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.preset = "transformer_base"
    c.model.overrides.update(
        {
            "d_model": 128,
            "num_heads": 4,
            "d_ff": 512,
            "num_encoder_layers": 2,
            "num_decoder_layers": 2,
            "dropout_rate": 0.0,
            "pre_norm": True,
            "dtype": "float32",
        }
    )
    c.vocab_size = 4000
    c.max_length = 64
    c.batch_size = 32
    c.num_train_steps = 1200  # about 6.5 min of training on 2 cores, 7.5 min with data preparation
    c.schedule = "cosine"
    c.learning_rate = 5e-3
    c.warmup_steps = 150
    c.clip_norm = 1.0
    c.log_every = 25
    c.eval_every = 600
    c.eval_batches = 10
    c.bleu_every = 0
    c.bleu_examples = 200
    c.max_decode_length = 64
    c.checkpoint_every = 600
    return c
