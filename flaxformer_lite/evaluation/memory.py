"""Perplexity of whole documents read segment by segment with Transformer-XL memory.

`memory_perplexity(model, params, documents, segment_length=T)` feeds each document T tokens at a
time, the model's memory (`ModelConfig.memory_length` M, model/memory.py) carrying the keys and
values of the last M positions from segment to segment, and scores every token exactly once: the
first from BOS (id 0, as `ops.shift_right`), token t from tokens 0..t-1 of which it sees the
last M + (t mod T) or fewer. With M = 0 it is the perplexity of the document cut into independent
segments of T; with M >= T the usable context grows to between M and M + T tokens.

Rows of a batch read documents in order; a document starts a fresh segment in the first free row
and is the row's only document in each of its segments, so the score of a document does not
depend on batch_size or on its neighbours (tests/test_memory.py checks it against one pass over
each document with the equivalent banded mask).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxformer_lite.model.memory import MEMORY
from flaxformer_lite.model.models import variant


def memory_perplexity(
    model: nn.Module, params, documents: Sequence[Sequence[int]], *, segment_length: int, batch_size: int = 8
) -> dict:
    """{"perplexity", "loss" (mean NLL per token), "nll_sum", "tokens", "documents"} of `documents`.

    model: a `DecoderOnly` (its config's memory_length M; dropout is turned off here). params: its
    params. documents: token id sequences, scored as given (append EOS yourself to score it).
    segment_length: tokens per forward pass (T); batch_size: documents read side by side.
    Compiles one step for [batch_size, T] inputs.
    """
    if segment_length < 1 or batch_size < 1:
        raise ValueError(f"segment_length={segment_length} and batch_size={batch_size} must be positive.")
    model = variant(model, deterministic=True)
    step = jax.jit(lambda p, mem, *batch: _step(model, p, mem, *batch))
    memory, nll_sum, tokens = None, 0.0, 0
    for batch in _segments(documents, segment_length, batch_size):
        if memory is None:
            memory = _empty_memory(model, params, batch)
        nll, count, memory = step(params, memory, *batch)
        nll_sum, tokens = nll_sum + float(nll), tokens + int(count)
    loss = nll_sum / max(tokens, 1)
    n_docs = sum(1 for d in documents if len(d))
    return {
        "perplexity": math.exp(loss),
        "loss": loss,
        "nll_sum": nll_sum,
        "tokens": tokens,
        "documents": n_docs,
    }


def _empty_memory(model, params, batch):
    """Empty memory of the shapes a [B, T] batch makes (none at all when memory_length is 0)."""
    shapes = jax.eval_shape(lambda p: _apply(model, p, {}, *batch[1:])[1], params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _apply(model, params, memory, inputs, doc_ids, positions):
    """(logits [B, T, V], the new memory collection) of one segment."""
    variables = {"params": params, **({MEMORY: memory} if memory else {})}
    logits, new = model.apply(variables, inputs, segment_ids=doc_ids, positions=positions, mutable=[MEMORY])
    return logits, new.get(MEMORY, {})


def _step(model, params, memory, targets, inputs, doc_ids, positions):
    """(NLL sum, token count, new memory) of one [B, T] segment; doc id 0 marks padding."""
    logits, memory = _apply(model, params, memory, inputs, doc_ids, positions)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    weights = (doc_ids > 0).astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights), memory


def _segments(documents, T: int, B: int) -> Iterator[tuple[np.ndarray, ...]]:
    """(targets, inputs, document ids, positions), each [B, T] int32, until every document is read.

    Document i has id i + 1 in the row that reads it; a row whose document ended takes the next
    unread one at its next segment, or pads (id 0) when none is left.
    """
    queue = ((i, np.asarray(d, np.int32)) for i, d in enumerate(documents) if len(d))
    rows: list = [None] * B  # per row: (document index, ids, offset of the next token)
    while True:
        for r in range(B):
            if rows[r] is None or rows[r][2] >= len(rows[r][1]):
                nxt = next(queue, None)
                rows[r] = None if nxt is None else (*nxt, 0)
        if all(row is None for row in rows):
            return
        out = np.zeros((4, B, T), np.int32)  # targets, inputs, doc ids, positions
        for r, row in enumerate(rows):
            if row is None:
                continue
            index, ids, offset = row
            n = min(T, len(ids) - offset)
            out[0, r, :n] = ids[offset : offset + n]
            out[1, r, 1 if offset == 0 else 0 : n] = ids[max(offset - 1, 0) : offset + n - 1]  # BOS first
            out[2, r, :n] = index + 1
            out[3, r, :n] = np.arange(offset, offset + n)
            rows[r] = (index, ids, offset + n)
        yield tuple(out)
