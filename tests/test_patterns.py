"""Sparse attention patterns (ops/patterns.py): masks, the model's use of them, splash's kernel.

- Each pattern's mask against its definition written here with Python loops (window, globals,
  random blocks, chunks), with and without packed segment ids, bidirectional and causal.
- BigBird's random blocks: how many, where from, fixed by the seed.
- MultiHeadAttention: output i depends on input j exactly where the closed form allows (encoder
  and decoder); KV-cache decoding equals the full forward pass.
- Splash (Pallas interpret mode) against the einsum reference, forward and gradients in fp32, and
  the blocks splash's own mask processing keeps against a closed form over blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flaxformer_lite as fl
from flaxformer_lite import ops
from flaxformer_lite.model import attention
from flaxformer_lite.ops import fused, patterns

KINDS = ("local", "longformer", "longformer_listed", "bigbird", "chunked")


def _pattern(kind: str, block: int = 4) -> ops.AttentionPattern:
    """Small patterns (T around 37, bigbird blocks of 4, so every rule has rows and blocks to bite)."""
    return {
        "local": ops.AttentionPattern("local", window=3),
        "longformer": ops.AttentionPattern("longformer", window=3, global_tokens=2),
        "longformer_listed": ops.AttentionPattern("longformer", window=2, global_tokens=(0, 11, 30)),
        "bigbird": ops.AttentionPattern(
            "bigbird", window=2 * block, global_tokens=block, block=block, random_blocks=2, seed=5
        ),
        "chunked": ops.AttentionPattern("chunked", window=5),
    }[kind]


def _closed_form(p: ops.AttentionPattern, T: int, S: int, causal: bool, table=None) -> np.ndarray:
    """bool [T, S] by the definitions, one (query, key) pair at a time."""
    m = np.zeros((T, S), bool)
    g = p.global_tokens
    is_global = (lambda x: x < g) if isinstance(g, int) else (lambda x: x in g)
    for i in range(T):
        for j in range(S):
            if p.kind == "local":
                ok = abs(i - j) < p.window
            elif p.kind == "longformer":
                ok = abs(i - j) < p.window or is_global(i) or is_global(j)
            elif p.kind == "chunked":
                ok = i // p.window == j // p.window
            else:  # bigbird, on blocks
                bi, bj, gb = i // p.block, j // p.block, g // p.block
                ok = abs(bi - bj) < p.window // p.block or bi < gb or bj < gb or bj in set(table[bi])
            m[i, j] = (ok or i == j) and (j <= i or not causal)
    return m


def _table(p, n, causal):
    return patterns.bigbird_random_blocks(
        n, window_blocks=p.window // p.block, global_blocks=p.global_tokens // p.block,
        random_blocks=p.random_blocks, seed=p.seed, causal=causal,
    )  # fmt: skip


def _packed(T, ends):
    """[1, T] ids 1.. with sequences ending at `ends`, padding (0) after the last."""
    seg, start = np.zeros((1, T), np.int32), 0
    for n, end in enumerate(ends):
        seg[0, start:end], start = n + 1, end
    return seg


def _expected(p, T, causal, seg):
    table = _table(p, -(-T // p.block), causal) if p.kind == "bigbird" else None
    m = _closed_form(p, T, T, causal, table)[None]
    return m if seg is None else m & (seg[:, :, None] == seg[:, None, :])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_pattern_mask_equals_closed_form(kind, causal):
    T = 37
    p = _pattern(kind)
    idx = jnp.arange(T)[None]
    for seg in (None, _packed(T, [9, 10, 25, 34])):
        got = ops.pattern_mask(p, idx, idx, causal=causal)
        if seg is not None:
            got = got & ops.segment_mask(jnp.asarray(seg), jnp.asarray(seg))
        want = _expected(p, T, causal, seg)
        np.testing.assert_array_equal(np.asarray(got)[:, 0], want)
        assert np.asarray(got).any(-1).all(), "a query row without any key"  # the NaN guard


def test_builders_equal_closed_form():
    """The per-pattern builders (diagonal not forced: they are the bare definitions)."""
    T = 23
    idx = jnp.arange(T)[None]
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    np.testing.assert_array_equal(ops.local_mask(idx, idx, 4)[0, 0], np.abs(i - j) < 4)
    np.testing.assert_array_equal(ops.local_mask(idx, idx, 4, left_only=True)[0, 0], (i - j < 4) & (j <= i))
    lf = (np.abs(i - j) < 2) | np.isin(i, [3, 20]) | np.isin(j, [3, 20])
    np.testing.assert_array_equal(ops.longformer_mask(idx, idx, 2, (3, 20))[0, 0], lf)
    np.testing.assert_array_equal(ops.chunked_mask(idx, idx, 6)[0, 0], i // 6 == j // 6)
    p = _pattern("bigbird")
    got = ops.bigbird_mask(idx, idx, block=4, window=8, global_tokens=4, random_blocks=2, seed=5, causal=True)
    want = _closed_form(p, T, T, False, _table(p, 6, True)) | (i == j)  # diagonal: in its own block
    np.testing.assert_array_equal(got[0, 0], want)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_random_blocks(causal):
    n, wb, gb, r = 16, 2, 1, 3
    table = patterns.bigbird_random_blocks(
        n, window_blocks=wb, global_blocks=gb, random_blocks=r, seed=7, causal=causal
    )
    for i in range(n):
        drawn = [j for j in table[i] if j >= 0]
        free = [j for j in range(n) if abs(i - j) >= wb and j >= gb and (j <= i or not causal)]
        assert len(set(drawn)) == len(drawn) == (0 if i < gb else min(r, len(free))), (i, drawn)
        assert set(drawn) <= set(free)
    again = patterns.bigbird_random_blocks(
        n, window_blocks=wb, global_blocks=gb, random_blocks=r, seed=7, causal=causal
    )
    np.testing.assert_array_equal(table, again)
    other = patterns.bigbird_random_blocks(
        n, window_blocks=wb, global_blocks=gb, random_blocks=r, seed=8, causal=causal
    )
    assert (other != table).any()
    if causal:  # a causal row does not depend on how many blocks follow (decoding a longer cache)
        longer = patterns.bigbird_random_blocks(
            2 * n, window_blocks=wb, global_blocks=gb, random_blocks=r, seed=7, causal=True
        )
        np.testing.assert_array_equal(longer[:n], table)


def test_shape_annotations():
    """The builders' jaxtyping annotations, checked by beartype (distinct T=3, S=5)."""
    from beartype import beartype
    from jaxtyping import jaxtyped

    q, kv = jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 5), jnp.int32)
    checked = lambda fn: jaxtyped(typechecker=beartype)(fn)  # noqa: E731
    for fn, args in [(ops.local_mask, (2,)), (ops.longformer_mask, (2, 1)), (ops.chunked_mask, (2,))]:
        assert checked(fn)(q, kv, *args).shape == (2, 1, 3, 5)
    assert checked(ops.bigbird_mask)(q, kv, block=2, window=2).shape == (2, 1, 3, 5)
    assert checked(ops.pattern_mask)(_pattern("longformer"), q, kv, causal=True).shape == (2, 1, 3, 5)


def test_pattern_and_config_errors():
    with pytest.raises(ValueError, match="multiples of the block"):
        ops.AttentionPattern("bigbird", window=100, block=128)
    with pytest.raises(ValueError, match="use one of"):
        ops.AttentionPattern("dilated", window=4)
    with pytest.raises(ValueError, match="is for longformer and bigbird"):
        ops.AttentionPattern("chunked", window=4, global_tokens=2)
    with pytest.raises(ValueError, match="positive window"):
        fl.tiny(attention_pattern="longformer")
    with pytest.raises(ValueError, match="local_window=None"):
        fl.tiny(attention_pattern="chunked", pattern_window=4, local_window=3)
    with pytest.raises(ValueError, match="128-multiples"):
        fl.tiny(attention_pattern="bigbird", pattern_window=64, pattern_block=64, attention_impl="splash")
    cfg = fl.tiny(attention_pattern="longformer", pattern_window=3, global_tokens=[0, 5])
    assert cfg.pattern == ops.AttentionPattern("longformer", 3, (0, 5)) and fl.tiny().pattern is None


def test_implementation_choice():
    lf, bb = ops.AttentionPattern("longformer", 3, 1), ops.AttentionPattern("bigbird", 128, 0, 64)
    kw = dict(dtype=jnp.bfloat16, head_dim=64, q_len=1024, kv_len=1024)
    impl, why = ops.choose_implementation("gpu", pattern=lf, **kw)
    assert impl == "xla" and "longformer" in why
    assert ops.choose_implementation("tpu", pattern=lf, **kw)[0] == "splash"
    assert ops.choose_implementation("tpu", pattern=bb, **kw)[0] == "xla"


# ---------------------------------------------------------------- the model


def _attention_support(cfg, causal, seg):
    """bool [T, T]: whether MultiHeadAttention's output i depends on input j (Jacobian != 0)."""
    T = seg.shape[1]
    module = attention.MultiHeadAttention(cfg, causal=causal)
    x = jax.random.normal(jax.random.key(0), (1, T, cfg.d_model))
    params = module.init(jax.random.key(1), x, segment_ids=seg)
    f = lambda x: module.apply(params, x, segment_ids=seg)[0].sum(-1)  # noqa: E731  [T]
    jac = jax.jit(jax.jacobian(f))(x)[:, 0]  # [T, T, d_model]
    return np.abs(np.asarray(jac)).sum(-1) > 0


LAYER_CASES = [("longformer_listed", False), ("bigbird", True), ("chunked", False)]  # False: encoder


@pytest.mark.parametrize(
    "kind,causal",
    LAYER_CASES
    + [pytest.param(k, not c, marks=pytest.mark.slow) for k, c in LAYER_CASES]
    + [pytest.param("longformer", True, marks=pytest.mark.slow)],
)
def test_attention_layer_sees_exactly_the_pattern(kind, causal):
    T = 37
    seg = _packed(T, [20, 33])  # two sequences and padding
    p = _pattern(kind)
    cfg = fl.tiny(
        attention_pattern=p.kind, pattern_window=p.window, global_tokens=p.global_tokens,
        pattern_block=p.block, random_blocks=p.random_blocks, pattern_seed=p.seed, position="rope",
        max_len=64,
    )  # fmt: skip
    got = _attention_support(cfg, causal, jnp.asarray(seg))
    want = _expected(p, T, causal, seg)[0]
    real = seg[0] != 0  # padding queries are 0 on every path: no dependence at all
    np.testing.assert_array_equal(got[real], want[real])
    assert not got[~real].any()


@pytest.mark.parametrize("kind", ["bigbird", pytest.param("longformer", marks=pytest.mark.slow)])
def test_kv_cache_decoding_equals_full_forward(kind):
    L = 23
    p = _pattern(kind)
    cfg = fl.tiny(
        max_len=L, position="rope", attention_pattern=p.kind, pattern_window=p.window,
        global_tokens=p.global_tokens, pattern_block=p.block, random_blocks=p.random_blocks,
        pattern_seed=p.seed,
    )  # fmt: skip
    tokens = jax.random.randint(jax.random.key(0), (2, L), 1, 67)
    params = nn.unbox(jax.jit(fl.DecoderOnly(cfg).init)(jax.random.key(42), tokens)["params"])
    full = jax.jit(fl.DecoderOnly(cfg.replace(deterministic=True)).apply)({"params": params}, tokens)
    model = fl.DecoderOnly(cfg.replace(decode=True, deterministic=True))
    _, state = jax.jit(lambda t: model.apply({"params": params}, t, mutable=["cache"]))(
        jnp.zeros_like(tokens)
    )
    step = jax.jit(lambda state, t: model.apply({"params": params, **state}, t, mutable=["cache"]))
    out = []
    for a, b in [(0, 5)] + [(t, t + 1) for t in range(5, L)]:
        logits, state = step(state, tokens[:, a:b])
        out.append(logits)
    np.testing.assert_allclose(jnp.concatenate(out, axis=1), full, rtol=1e-4, atol=1e-4)
    free = fl.DecoderOnly(fl.tiny(max_len=L, position="rope", deterministic=True)).apply
    assert not np.allclose(jax.jit(free)({"params": params}, tokens), full, atol=1e-3)  # the pattern bites


# ---------------------------------------------------------------- splash attention (interpret mode)

SPLASH_PATTERNS = {  # T = 512: splash blocks of 128 (forced below) or bigbird's
    "local": ops.AttentionPattern("local", window=100),
    "longformer": ops.AttentionPattern("longformer", window=100, global_tokens=3),
    "bigbird": ops.AttentionPattern(
        "bigbird", window=128, global_tokens=128, block=128, random_blocks=1, seed=3
    ),
    "chunked": ops.AttentionPattern("chunked", window=192),
}


def _check_splash(p, causal, seg, T, monkeypatch):
    """splash_interpret vs the einsum reference on the dense closed-form mask: fwd and grads, fp32."""
    monkeypatch.setattr(fused, "SPLASH_BLOCKS", (128,))  # 4 x 4 blocks at T=512: some are skipped
    q, k, v = (jax.random.normal(jax.random.key(i), (1, T, 2, 8)) for i in range(3))
    segment_ids = None if seg is None else jnp.asarray(seg)
    mask = jnp.asarray(_expected(p, T, causal, seg)[:, None])
    w = jax.random.normal(jax.random.key(9), q.shape)

    def splash(q, k, v):
        out = ops.dot_product_attention(
            q, k, v, is_causal=causal, segment_ids=segment_ids, pattern=p, implementation="splash_interpret"
        )
        return jnp.sum(out * w), out

    def ref(q, k, v):
        out = ops.reference_attention(q, k, v, mask=mask)
        out = out if seg is None else out * (segment_ids != 0)[:, :, None, None]
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(splash, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, want), want_grads = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)


FAST_SPLASH = [("longformer", True, True), ("bigbird", False, True), ("chunked", True, False)]


@pytest.mark.parametrize("kind,causal,packed", FAST_SPLASH)
def test_splash_pattern_matches_reference(kind, causal, packed, monkeypatch):
    seg = _packed(512, [130, 300, 500]) if packed else None
    _check_splash(SPLASH_PATTERNS[kind], causal, seg, 512, monkeypatch)


SLOW_SPLASH = [
    (kind, causal, packed)
    for kind in sorted(SPLASH_PATTERNS)
    for causal in (False, True)
    for packed in (False, True)
    if (kind, causal, packed) not in FAST_SPLASH
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,causal,packed", SLOW_SPLASH)
def test_splash_every_pattern_matches_reference(kind, causal, packed, monkeypatch):
    seg = _packed(512, [130, 300, 500]) if packed else None
    _check_splash(SPLASH_PATTERNS[kind], causal, seg, 512, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["longformer", "bigbird"])
def test_splash_pattern_at_1024(kind, monkeypatch):
    p = SPLASH_PATTERNS[kind]
    _check_splash(p, True, _packed(1024, [200, 700, 1024]), 1024, monkeypatch)


# ---------------------------------------------------------------- skipped blocks


def _longformer_blocks(T, b, w, g, causal):
    """Non-empty (query block, key block) pairs by interval arithmetic on whole blocks."""
    n, count = T // b, 0
    for I in range(n):
        for J in range(n):
            if causal and J > I:
                continue
            gap = max(I - J - 1, J - I - 1, -1) * b + 1  # the nearest pair's distance (<= 0: same block)
            count += gap < w or I * b < g or J * b < g
    return count


@pytest.mark.parametrize("causal", [False, True])
def test_splash_skips_blocks_as_the_closed_form_says(causal):
    """Splash's own mask processing (what its grid reads) keeps the blocks the closed form names:
    Longformer O(T * window / block^2 + globals), not O(T^2); BigBird its map's blocks."""
    T, w, g = 8192, 350, 3
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "SPLASH_BLOCKS", (256,))
        kept, total, b = fused.splash_block_counts(
            T, T, is_causal=causal, pattern=ops.AttentionPattern("longformer", w, g)
        )
    n = T // b
    assert (b, total) == (256, n * n)
    assert kept == _longformer_blocks(T, b, w, g, causal)
    assert kept <= 7 * n  # per row: 2 window blocks each side, itself, the global column; + global row
    p = ops.AttentionPattern("bigbird", window=256, global_tokens=512, block=256, random_blocks=2, seed=11)
    kept, total, b = fused.splash_block_counts(4096, 4096, is_causal=causal, pattern=p)
    nb = 4096 // 256
    table = _table(p, nb, causal)
    want = sum(
        (abs(I - J) < 1 or I < 2 or J < 2 or J in set(table[I])) and (J <= I or not causal)
        for I in range(nb)
        for J in range(nb)
    )
    assert (b, total, kept) == (256, nb * nb, want)


def test_pattern_refused_where_it_would_be_ignored():
    with pytest.raises(ValueError, match="memory positions grow"):
        fl.tiny(
            attention_pattern="bigbird", pattern_window=8, pattern_block=4, memory_length=8, position="rope"
        )


@pytest.mark.parametrize("causal", [False, True])
def test_block_is_empty_is_sound(causal):
    """A block the whole-block test calls empty has no allowed pair in the closed form (and the test
    does call many blocks empty: it is what spares splash's mask processing most evaluations)."""
    T, rng, said_empty = 64, np.random.default_rng(0), 0
    for kind in KINDS:
        p = _pattern(kind)
        n = -(-T // p.block)
        full = _closed_form(p, T, T, causal, _table(p, n, causal) if kind == "bigbird" else None)
        block_map = patterns.bigbird_block_map(p, n, causal) if kind == "bigbird" else None
        for _ in range(300):
            q0, k0 = rng.integers(0, T, 2)
            size = int(rng.choice([4, 8]))
            rows, cols = range(q0, min(T, q0 + size)), range(k0, min(T, k0 + size))
            if patterns.block_is_empty(p, rows, cols, causal=causal, block_map=block_map):
                said_empty += 1
                assert not full[rows.start : rows.stop, cols.start : cols.stop].any(), (kind, rows, cols)
    assert said_empty > 300
