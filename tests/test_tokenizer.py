"""SentencePiece training stopped by a signal, and a corpus with no text (issue 38 item 5).

A SIGTERM while SentencePiece reads the training texts runs train.py's handler inside SentencePiece's
callback; SentencePiece turns the handler's exception into a RuntimeError. It must come out as the
stop it is (exit 143, like every other phase), not as a tokenizer failure with a vocab_size fix.
"""

import os
import signal

import pytest

from flaxformer_lite.data import tokenizer
from flaxformer_lite.train import runtime


def _texts(signal_at: int | None = None, n: int = 2000):
    for i in range(n):
        if i == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        yield f"line {i} of a small corpus with some words, number {i * 7919 % 1000}"


def test_a_sigterm_while_sentencepiece_reads_the_texts_is_the_handlers_stop(tmp_path):
    stops = runtime.StopRequests()  # train.py's handlers (one process: SIGTERM and SIGINT)
    try:
        with pytest.raises(runtime.Stopped, match="SIGTERM received outside the training loop") as stopped:
            tokenizer.train_sentencepiece(_texts(signal_at=500), str(tmp_path / "spm.model"), vocab_size=300)
    finally:
        stops.close()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert not os.listdir(tmp_path)  # no model, no half-written one


def test_the_same_texts_without_a_signal_train(tmp_path):
    sp = tokenizer.train_sentencepiece(_texts(), str(tmp_path / "spm.model"), vocab_size=300)
    assert sp.get_piece_size() >= 260


def test_a_corpus_empty_after_normalisation_names_the_corpus_not_vocab_size(tmp_path):
    texts = ["", "   ", "\t", "\u200b", "\x01\x02"] * 20  # whitespace, a zero-width space, controls
    with pytest.raises(ValueError) as error:
        tokenizer.train_sentencepiece(iter(texts), str(tmp_path / "spm.model"), vocab_size=300)
    message = str(error.value)
    assert message.startswith("the corpus has no text to train the tokenizer on: its 100 training texts")
    assert "vocab_size" not in message
    assert not os.listdir(tmp_path)
