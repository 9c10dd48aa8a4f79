"""SentencePiece: train a joint vocabulary on training text once, save it, reuse it.

Reserved ids are in `flaxformer_lite.ids` (0 pad, 1 EOS, 2 unknown, 3 "<mask>"). With byte
fallback (default) characters never seen in training become byte pieces, never unknown.
"""

from __future__ import annotations

import io
import os
import re
import signal
from collections.abc import Iterable

import sentencepiece as spm
from absl import logging

from flaxformer_lite import files
from flaxformer_lite.ids import EOS_ID, PAD_ID, UNK_ID


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str,
    *,
    vocab_size: int,
    character_coverage: float = 1.0,
    model_type: str = "unigram",
    byte_fallback: bool = True,
    max_sentences: int = 1_000_000,
    max_sentence_length: int = 4096,
) -> spm.SentencePieceProcessor:
    """Train on `texts` (training split only!) and write `model_path` atomically."""
    model, counted = io.BytesIO(), _Counted(texts)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted,
            model_writer=model,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            model_type=model_type,
            byte_fallback=byte_fallback,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            user_defined_symbols=["<mask>"],
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        # A signal handler that raised while SentencePiece read `texts` (runtime.StopRequests: exit
        # 143/130) comes back as this RuntimeError, its exception lost: deliver the signal again so the
        # handler raises its own exception here, and the stop is not reported as a tokenizer failure.
        signalled = re.search(r"\b(SIGTERM|SIGINT) received|^INTERNAL: (KeyboardInterrupt)\b", str(e))
        if signalled:
            signal.raise_signal(signal.SIGTERM if signalled[1] == "SIGTERM" else signal.SIGINT)
        if "all_chars_count" in str(e):  # no character left after SentencePiece's normalisation
            raise ValueError(
                f"the corpus has no text to train the tokenizer on: its {counted.count} training texts "
                "are all empty once SentencePiece normalises them (whitespace and invisible characters "
                "removed); give the train split of the corpus some text (dataset_name / manual_dir)"
            ) from e
        raise ValueError(
            f"SentencePiece training failed ({e}). Adjust vocab_size (now {vocab_size}): a small "
            "corpus needs a smaller one, many distinct characters a larger one (or a lower "
            "character_coverage); byte_fallback needs vocab_size > 259."
        ) from e
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    tmp = model_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, model_path)  # never leave a half-written model behind
    logging.info(
        "trained SentencePiece model %s (vocab %d) on %d distinct sentences (it samples at most %d)",
        model_path, vocab_size, counted.count, max_sentences,
    )  # fmt: skip
    return load_sentencepiece(model_path)


class _Counted:
    """An iterator over texts that counts them (for the log)."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.count = iter(texts), 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        text = next(self.texts)
        self.count += 1
        return text


def load_sentencepiece(model_path: str) -> spm.SentencePieceProcessor:
    """Load a model written by `train_sentencepiece` (or any with pad 0, eos 1)."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"SentencePiece model {model_path!r} does not exist.")
    fix = (
        "it is damaged: delete it and rerun train.py with this workdir's config, which trains the same "
        "tokenizer again from the train split (then resumes from its checkpoints)"
    )
    with files.reading(model_path, fix):
        sp = spm.SentencePieceProcessor(model_file=model_path)
    if sp.pad_id() != PAD_ID or sp.eos_id() != EOS_ID:
        raise ValueError(
            f"{model_path!r} uses pad id {sp.pad_id()} and eos id {sp.eos_id()}; flaxformer_lite "
            f"needs pad={PAD_ID}, eos={EOS_ID}: delete it to retrain, or point to a compatible model."
        )
    return sp


def load_or_train(texts_fn, model_path: str, **train_kwargs) -> spm.SentencePieceProcessor:
    """Reuse `model_path` when present; otherwise train on `texts_fn()` and save it there."""
    if os.path.isfile(model_path):
        logging.info("reusing SentencePiece model %s", model_path)
        return load_sentencepiece(model_path)
    return train_sentencepiece(texts_fn(), model_path, **train_kwargs)
