import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import ops


def test_sinusoidal_table_matches_paper_formula():
    length, dim = 13, 10
    table = np.asarray(ops.sinusoidal_table(length, dim))
    for pos in range(length):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-5)


def _rope_numpy(x, positions, theta=10000.0):
    """Rotate channel pairs (i, i + H/2) by angle pos * theta^(-2i/H), written out as 2x2 rotations."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for b, t in np.ndindex(*x.shape[:2]):
        for i in range(half):
            a = positions[b, t] * theta ** (-2 * i / x.shape[-1])
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            pair = np.stack([x[b, t, :, i], x[b, t, :, i + half]])  # [2, N]
            out[b, t, :, i], out[b, t, :, i + half] = rot @ pair
    return out


def test_rope_matches_numpy_and_position_zero_is_identity():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    positions = np.array([[0, 1, 2, 3, 4], [7, 0, 11, 2, 5]])
    np.testing.assert_allclose(
        ops.apply_rope(x, jnp.asarray(positions)), _rope_numpy(x, positions), atol=1e-5
    )
    zero = ops.apply_rope(x, jnp.zeros((2, 5), jnp.int32))
    np.testing.assert_allclose(zero, x, atol=1e-6)


def test_rope_dot_product_depends_only_on_relative_offset():
    kq, kk = jax.random.split(jax.random.key(1))
    q = jax.random.normal(kq, (1, 1, 1, 16))
    k = jax.random.normal(kk, (1, 1, 1, 16))

    def score(pq, pk):
        rq = ops.apply_rope(q, jnp.array([[pq]]))
        rk = ops.apply_rope(k, jnp.array([[pk]]))
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
    assert score(0, 7) == pytest.approx(score(20, 27), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def _t5_bucket(rel, bidirectional, num_buckets, max_distance):
    """Scalar transcription of T5's _relative_position_bucket (mesh_tensorflow)."""
    ret, n = 0, -rel
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_match_t5(bidirectional):
    rel = np.arange(-300, 300)
    got = ops.relative_position_bucket(
        jnp.asarray(rel), bidirectional=bidirectional, num_buckets=32, max_distance=128
    )
    want = [_t5_bucket(int(r), bidirectional, 32, 128) for r in rel]
    np.testing.assert_array_equal(got, want)


def test_relative_bias_looks_up_table_per_head():
    table = jax.random.normal(jax.random.key(2), (32, 3))
    pos = jnp.arange(6)[None]
    bias = ops.relative_position_bias(pos, pos, table, bidirectional=True)
    assert bias.shape == (1, 3, 6, 6)
    for i in range(6):
        for j in range(6):
            np.testing.assert_allclose(bias[0, :, i, j], table[_t5_bucket(j - i, True, 32, 128)])


def test_alibi_slopes_and_bias():
    np.testing.assert_allclose(ops.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-6)
    # 12 heads: the 8-head slopes, then every other slope of the 16-head sequence (paper recipe).
    want12 = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]
    np.testing.assert_allclose(ops.alibi_slopes(12), want12, rtol=1e-6)
    pos = jnp.arange(5)[None]
    bias = ops.alibi_bias(pos, pos, 8)
    np.testing.assert_allclose(bias[0, 2], -0.125 * np.abs(np.subtract.outer(range(5), range(5))))
