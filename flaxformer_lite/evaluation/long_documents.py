"""Strided sliding-window perplexity of a language model over whole documents.

The protocol of the transformers docs' "Perplexity of fixed-length models": a window of `window`
tokens slides over each document `stride` tokens at a time; in every window but the first, the
first `window - stride` positions are context only and the rest are scored, so every token is
scored exactly once, with at least `window - stride` tokens before it (all of them in the first
window). Stride = window is plain chunking (no context carried over); stride 1 gives every token
the full window. Each window is one row of the model's normal forward pass (no KV cache); the
loss is the fp32 log-softmax NLL.

A document is the token stream [start, t_0, ..., t_{n-1}, EOS] (start: the decoder's start token,
as in training) whose targets are t_0, ..., EOS; window position p feeds stream[begin + p] and
predicts stream[begin + p + 1]. transformers' loop on a text t (no start token) with window L
scores what this does with window L - 1 on the stream t (see tests/test_long_documents.py).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from flaxformer_lite import ops, sharding
from flaxformer_lite.data.pipeline import text_of
from flaxformer_lite.evaluation import corpus_metrics
from flaxformer_lite.ids import EOS_ID, PAD_ID
from flaxformer_lite.model.models import variant


def plan_windows(num_targets: int, window: int, stride: int) -> np.ndarray:
    """[W, 3] int64 rows (begin, end, first scored): the windows over `num_targets` targets.

    Window k predicts targets [begin, end) from the inputs at the same positions and scores
    targets [first scored, end): all of them in the first window, then the `end - previous end`
    (= stride, less in the last window) not scored before. The transformers docs' loop, verbatim.
    """
    if not 0 < stride <= window:
        raise ValueError(f"the stride must be in 1..window ({window}); got {stride}.")
    rows, previous_end = [], 0
    for begin in range(0, max(num_targets, 1), stride):
        end = min(begin + window, num_targets)
        rows.append((begin, end, previous_end))
        previous_end = end
        if end == num_targets:
            break
    return np.asarray(rows, np.int64).reshape(-1, 3)


def window_rows(streams: list[np.ndarray], windows, window: int, rows: int) -> dict[str, np.ndarray]:
    """[rows, window] arrays of the `windows` (document, begin, end, first scored) of token `streams`
    (each [n + 1], its targets stream[1:]); rows past the windows are padding (nothing scored).

    `decoder_inputs` = stream[begin:end], `targets` = stream[begin + 1:end + 1], `targets_segment_ids`
    1 on the window, `targets_positions` 0.. per window, `scored` 1 on targets [first, end).
    """
    out = {k: np.zeros((rows, window), np.int32) for k in _ROW_KEYS}
    for row, (doc, begin, end, first) in enumerate(windows):
        stream, n = streams[doc], end - begin
        out["decoder_inputs"][row, :n] = stream[begin:end]
        out["targets"][row, :n] = stream[begin + 1 : end + 1]
        out["targets_segment_ids"][row, :n] = 1
        out["targets_positions"][row, :n] = np.arange(n)
        out["scored"][row, first - begin : n] = 1
    return out


_ROW_KEYS = ("decoder_inputs", "targets", "targets_segment_ids", "targets_positions", "scored")


def _window_sums(params, rows: dict, *, model, task):
    """(NLL sum, scored count) of a batch of windows: fp32 log-softmax over the model's logits."""
    logits, targets, _ = task.forward(model, params, rows, jax.random.key(0), rows["decoder_inputs"])
    return ops.cross_entropy(logits, targets, rows["scored"])


_window_sums_jit = jax.jit(sharding.under_rules(_window_sums), static_argnames=("model", "task"))


def strided_nll(
    params, model, task, streams: list[np.ndarray], *, window: int, stride: int, batch_size: int, mesh
) -> dict:
    """NLL sum, scored tokens and window count of `streams` (each [start, ..., EOS]): the windows of
    every document, `batch_size` rows at a time (made batch by batch; the last padded, unscored)."""
    if model.config.position == "learned" and window > model.config.max_len:
        raise ValueError(
            f"window {window} is longer than the model's {model.config.max_len} learned positions; "
            "pass a window <= max_len."
        )
    windows = [(d, *w) for d, s in enumerate(streams) for w in plan_windows(len(s) - 1, window, stride)]
    step = functools.partial(_window_sums_jit, model=model, task=task)
    nll, scored = 0.0, 0.0
    local = batch_size // jax.process_count()  # each host feeds its slice of every global batch
    with jax.set_mesh(mesh):
        for first in range(0, len(windows), batch_size):  # the same batches on every host
            lo = first + jax.process_index() * local
            rows = window_rows(streams, windows[lo : lo + local], window, local)
            sums = step(params, sharding.global_batch(rows, mesh))
            nll, scored = nll + float(sums[0]), scored + float(sums[1])
    return {"nll_sum": nll, "tokens": scored, "windows": len(windows)}


def document_streams(sp, texts) -> list[np.ndarray]:
    """Each text, whole (never trimmed), as the stream [start, ids..., EOS]."""
    return [np.asarray([PAD_ID, *sp.encode(text_of(t)), EOS_ID], np.int32) for t in texts]


def evaluate(exp, params, split: str, *, window: int, strides: tuple[int, ...], memories=()) -> dict:
    """Strided perplexity of `exp`'s language model on the whole documents of `split`, per stride:
    {"window", "documents", "document_tokens", "strided": {stride: {nll, perplexity, tokens, windows}}},
    and with `memories` (Transformer-XL memory lengths) "segment_length" and
    "memory": {M: {nll, perplexity, tokens}}: the same tokens read in segments of max_length."""
    if not exp.task.generates:
        raise ValueError(
            f"strided perplexity scores a language model; task {exp.task.name!r} is not one: "
            "leave long_document_strides empty."
        )
    feature = exp.data.keys["targets"]
    source = exp.data.open(split)
    streams = document_streams(exp.tokenizer, (source[i][feature] for i in range(len(source))))
    out = {"window": window, "documents": len(streams), "document_tokens": sum(len(s) - 1 for s in streams)}
    out["strided"] = {}
    if memories:
        out["segment_length"] = exp.config.max_length
        out["memory"] = _memory_perplexities(exp, params, streams, memories)
    for stride in strides:
        sums = strided_nll(
            params, exp.inference_model, exp.task, streams, window=window, stride=stride,
            batch_size=exp.config.batch_size, mesh=exp.mesh,
        )  # fmt: skip
        out["strided"][str(stride)] = {
            "nll": sums["nll_sum"] / sums["tokens"],
            "perplexity": corpus_metrics.perplexity(sums["nll_sum"], sums["tokens"]),
            "tokens": sums["tokens"],
            "windows": sums["windows"],
        }
    return out


def _memory_perplexities(exp, params, streams, memories) -> dict:
    """{M: {nll, perplexity, tokens}}: each stream's tokens after its start, with memory M (memory.py)."""
    from flaxformer_lite.evaluation.memory import memory_perplexity

    out = {}
    for memory in memories:
        r = memory_perplexity(
            variant(exp.inference_model, memory_length=memory), params, [s[1:] for s in streams],
            segment_length=exp.config.max_length, batch_size=exp.config.batch_size,
        )  # fmt: skip
        out[str(memory)] = {"nll": r["loss"], "perplexity": r["perplexity"], "tokens": r["tokens"]}
    return out


def _integers(text: str, field: str) -> tuple[int, ...]:
    """The integers of "64,128" (empty parts skipped); a one-line error naming `field` otherwise."""
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"bad config: {field}={text!r}; give comma-separated integers.") from None


def parse_lengths(text: str, field: str) -> tuple[int, ...]:
    """The lengths of "0,128,256": (0, 128, 256), each >= 0 (a one-line error otherwise)."""
    lengths = _integers(text, field)
    if any(n < 0 for n in lengths):
        raise ValueError(f"bad config: {field}={text!r}; lengths must be >= 0.")
    return lengths


def parse_strides(text: str, window: int) -> tuple[int, ...]:
    """The strides of "64,128": (64, 128), each within 1..window."""
    strides = _integers(text, "long_document_strides")
    for stride in strides:
        if not 0 < stride <= window:
            raise ValueError(
                f"bad config: stride {stride} in long_document_strides must be in 1..window ({window})."
            )
    return strides
