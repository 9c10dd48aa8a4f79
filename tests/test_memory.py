"""Transformer-XL memory (model/memory.py): segment by segment equals one banded pass.

The reference is the memory-less model over the whole stream in one call, with a band written
here in numpy added to every self-attention mask (query i of the segment starting at s0 sees keys
j with s0 - M <= j <= i; the model adds causality and same-document), through the plain
`ops.dot_product_attention` path, not the memory's concatenated head-major cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig, tiny
from flaxformer_lite.evaluation.memory import memory_perplexity
from flaxformer_lite.model.models import DecoderOnly, EncoderDecoder
from tests import reference

B, T, SEGMENTS = 2, 7, 3  # rows, segment length, segments: a stream of 21 positions per row
L = T * SEGMENTS


def _stream():
    """Tokens, document ids (running, 0 = none) and positions [B, L]: row 0 one document; row 1
    a document ending mid-segment (at 5), one ending at a segment boundary (14), a third after it."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 67, (B, L)).astype(np.int32)
    docs = np.ones((B, L), np.int32)
    docs[1] = np.repeat([1, 2, 3], [5, 9, 7])
    positions = np.zeros((B, L), np.int32)
    for b in range(B):
        for d in np.unique(docs[b]):
            where = docs[b] == d
            positions[b, where] = np.arange(where.sum())
    return tokens, docs, positions


def _band(memory_length, length=L):
    """[1, 1, L, L] numpy: key j no earlier than memory_length before the query's segment start."""
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    return (j >= (i // T) * T - memory_length)[None, None]


def _one_pass(cfg, params, tokens, docs, positions, monkeypatch):
    band = jnp.asarray(_band(cfg.memory_length, tokens.shape[1]))
    plain = ops.dot_product_attention

    def banded(q, k, v, *, mask=None, **kw):
        return plain(q, k, v, mask=ops.combine_masks(mask, band), **kw)

    with monkeypatch.context() as m:
        m.setattr(ops, "dot_product_attention", banded)
        model = DecoderOnly(cfg.replace(memory_length=0))
        return model.apply({"params": params}, tokens, segment_ids=docs, positions=positions)


def _segments(cfg, params, tokens, docs, positions):
    """Logits [B, L, V] fed T at a time with the memory carried; and the last memory."""
    apply = jax.jit(lambda variables, *a: DecoderOnly(cfg).apply(
        variables, a[0], segment_ids=a[1], positions=a[2], mutable=["memory"]))  # fmt: skip
    variables, out = {"params": params}, []
    for s in range(SEGMENTS):
        part = slice(s * T, (s + 1) * T)
        logits, new = apply(variables, tokens[:, part], docs[:, part], positions[:, part])
        variables = {"params": params, **new}  # no memory at all when memory_length is 0
        out.append(logits)
    return jnp.concatenate(out, axis=1), variables.get("memory")


def _init(cfg):
    tokens, docs, positions = _stream()
    params = DecoderOnly(cfg).init(
        jax.random.key(1), tokens[:, :T], segment_ids=docs[:, :T], positions=positions[:, :T]
    )["params"]
    return params, tokens, docs, positions


@pytest.mark.parametrize(
    "position,memory_length,scan",
    [("rope", 7, False), ("relative", 10, True), ("alibi", 4, False), ("rope", 14, True)],
)
def test_segments_with_memory_equal_one_banded_pass(position, memory_length, scan, monkeypatch):
    cfg = tiny(position=position, memory_length=memory_length, scan_layers=scan, pre_norm=True)
    params, tokens, docs, positions = _init(cfg)
    got, _ = _segments(cfg, params, tokens, docs, positions)
    want = _one_pass(cfg, params, tokens, docs, positions, monkeypatch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The memory is used: without it (M = 0) the later segments differ.
    no_memory, _ = _segments(cfg.replace(memory_length=0), params, tokens, docs, positions)
    assert np.abs(np.asarray(no_memory - got)[0, T:]).max() > 1e-3


@pytest.mark.parametrize(
    "pattern",
    [
        dict(attention_pattern="local", pattern_window=5),
        dict(attention_pattern="longformer", pattern_window=3, global_tokens=2),
    ],
)
def test_memory_with_a_sparse_pattern_equals_one_banded_sparse_pass(pattern, monkeypatch):
    """Row 0 holds one document, so its document positions are its row indices, which is what the
    one-pass pattern reads: the band and the pattern together, segment by segment."""
    cfg = tiny(position="rope", memory_length=7, pre_norm=True, **pattern)
    params, tokens, docs, positions = _init(cfg)
    got, _ = _segments(cfg, params, tokens, docs, positions)
    want = _one_pass(cfg, params, tokens, docs, positions, monkeypatch)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    dense, _ = _segments(
        cfg.replace(attention_pattern="full", global_tokens=0), params, tokens, docs, positions
    )
    assert np.abs(np.asarray(dense - got)[0]).max() > 1e-3  # the pattern is applied


def test_a_new_document_does_not_see_the_previous_ones_memory():
    cfg = tiny(position="rope", memory_length=7)
    params, tokens, docs, positions = _init(cfg)
    got, _ = _segments(cfg, params, tokens, docs, positions)
    # Row 1's third document starts at the third segment: as if it were fed alone, without memory.
    alone = DecoderOnly(cfg.replace(memory_length=0)).apply(
        {"params": params},
        tokens[1:, 2 * T :],
        segment_ids=docs[1:, 2 * T :],
        positions=positions[1:, 2 * T :],
    )
    np.testing.assert_allclose(got[1:, 2 * T :], alone, rtol=1e-5, atol=1e-5)


def test_no_gradient_flows_into_the_memory():
    cfg = tiny(position="relative", memory_length=7)
    params, tokens, docs, positions = _init(cfg)
    _, memory = _segments(cfg, params, tokens[:, : 2 * T], docs[:, : 2 * T], positions[:, : 2 * T])
    part = slice(2 * T, 3 * T)

    def loss(params, memory):
        logits, _ = DecoderOnly(cfg).apply(
            {"params": params, "memory": memory}, tokens[:, part], segment_ids=docs[:, part],
            positions=positions[:, part], mutable=["memory"],
        )  # fmt: skip
        return jnp.sum(logits**2)

    d_params, d_memory = jax.grad(loss, argnums=(0, 1), allow_int=True)(params, memory)
    for path, g in jax.tree_util.tree_leaves_with_path(d_memory):
        if g.dtype != jax.dtypes.float0:
            np.testing.assert_array_equal(g, 0, err_msg=jax.tree_util.keystr(path))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(d_params)) > 0


def test_memory_refuses_absolute_positions_and_encoder_decoders():
    with pytest.raises(ValueError, match="memory needs relative positions"):
        ModelConfig(position="learned", memory_length=4)
    cfg = tiny(position="rope", memory_length=4)
    x = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="decoder-only"):
        EncoderDecoder(cfg).init(jax.random.key(0), x, x)
    with pytest.raises(ValueError, match="document ids and positions"):
        DecoderOnly(cfg).init(jax.random.key(0), x)


def test_memory_perplexity_equals_one_banded_pass_per_document(monkeypatch):
    cfg = tiny(position="alibi", memory_length=5, dropout_rate=0.3)  # dropout: must be off in eval
    params, *_ = _init(cfg)
    rng = np.random.default_rng(2)
    documents = [rng.integers(1, 67, n) for n in (17, 9, 0, 12, 3)]  # an empty one is skipped
    got = memory_perplexity(DecoderOnly(cfg), params, documents, segment_length=T, batch_size=2)
    nll, count = 0.0, 0
    for doc in documents:
        if not len(doc):
            continue
        n = len(doc)
        inputs = np.concatenate([[0], doc[:-1]])[None].astype(np.int32)  # BOS first
        logits = _one_pass(
            cfg.replace(dropout_rate=0.0), params, inputs, np.ones((1, n), np.int32),
            np.arange(n, dtype=np.int32)[None], monkeypatch,
        )  # fmt: skip
        logp = reference.log_softmax(logits[0])
        nll -= logp[np.arange(n), doc].sum()
        count += n
    assert (got["tokens"], got["documents"]) == (count, 4)
    np.testing.assert_allclose(got["nll_sum"], nll, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], np.exp(nll / count), rtol=1e-5)
