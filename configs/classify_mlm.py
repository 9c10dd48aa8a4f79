"""Pretrain the encoder of configs/classify.py: masked LM (optionally plus BERT's next-sentence
prediction) on the English Bible's training books.

    python train.py --config=configs/classify_mlm.py --workdir=runs/classify/mlm
    python train.py --config=configs/classify_mlm.py --workdir=runs/classify/mlm_nsp \
        --config.next_sentence=True
"""

from configs import classify, default


def get_config():
    c = classify.body(default.get_config(), encoder=True)
    c.task = "mlm"
    c.dataset_name = "bible_lm"
    # BERT's second objective: each example is a pair of verses, the next one or a random one
    # (50/50), and the first-token head predicts which. False: plain MLM on single verses.
    c.batch_size = 32
    c.num_train_steps = 1200
    c.schedule = "cosine"
    c.learning_rate = 1e-3
    c.warmup_steps = 100
    c.b2 = 0.98
    c.weight_decay = 0.01
    c.clip_norm = 1.0
    c.label_smoothing = 0.0
    c.log_every = 25
    c.eval_every = 0
    c.eval_batches = 0
    c.checkpoint_every = 1200
    c.keep_checkpoints = 1
    return c
