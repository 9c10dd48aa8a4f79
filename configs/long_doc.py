"""Decoder-only LM on long documents: the chapters of the English Bible (bible_long/chapters, WEB 2000).

lm_compare's model (d_model 192, 4 layers, 6 heads, learned positions) on rows of 128 tokens; a
chapter (median ~700 tokens) is cut into consecutive pieces of 128 for training (long_examples),
and eval.py scores whole held-out chapters with a sliding window (strided perplexity). About
5 minutes on 2 CPU cores.

    python train.py --config=configs/long_doc.py --workdir=runs/long_doc
    python eval.py --config=configs/long_doc.py --workdir=runs/long_doc   # --split=test by default
"""

from configs import lm_compare


def get_config():
    c = lm_compare.get_config()
    c.dataset_name = "bible_long/chapters"  # or bible_long/books: a document per book
    c.long_examples = "split"  # chapters are longer than max_length: train on all of each, in pieces
    c.num_train_steps = 250  # 250 x 32 x 128 = 1.02M tokens, about one epoch of the train chapters
    c.checkpoint_every = 250
    # eval.py: strided perplexity over whole documents, window max_length (long_document_window 0);
    # stride 128 = separate chunks, 64 = every token after the first window sees >= 64 before it
    c.long_document_strides = "64,128"
    return c
