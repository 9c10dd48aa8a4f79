"""Sparse attention patterns as boolean masks (pure JAX): local, Longformer, BigBird, chunked.

Each builder maps query and key positions [B, T], [B, S] to a [B, 1, T, S] mask (True = may
attend) that ANDs with `causal_mask` and `segment_mask`. The model passes row indices as the
positions, so one rule (`pattern_rule`) serves the dense mask here and the per-block mask that
splash attention evaluates inside its kernel (`fused.pattern_splash_mask`): no T x S array is
ever built for the fused path. Global tokens are the first positions of a row (with packed rows,
the first sequence's tokens, which other sequences cannot see through their segment mask).

  local       |q - k| < window (left-only: also k <= q)
  longformer  local, plus global tokens: a global query sees every key, every query a global key
  bigbird     block level (block b): query block i sees key block j if |i - j| < window / b, either
              is one of the first global_tokens / b blocks, or j is one of i's `random_blocks`
              random blocks (drawn once from `seed`, among the blocks not already seen)
  chunked     q // window == k // window (attend within fixed chunks)

`pattern_mask` also keeps the diagonal on, so with any segment ids no query row is left empty.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Int

Array = jax.Array
PATTERNS = ("full", "local", "longformer", "bigbird", "chunked")


@dataclasses.dataclass(frozen=True)
class AttentionPattern:
    """A static sparse pattern (hashable: one compiled kernel per pattern).

    window: local/longformer: keys fewer than `window` positions away; bigbird: the same in
      tokens, a multiple of `block` (2 * block = BigBird's three blocks); chunked: the chunk length.
    global_tokens: longformer: the first G positions, or a tuple of positions; bigbird: the first
      G positions, a multiple of `block`.
    block, random_blocks, seed: bigbird's block, random key blocks per query block, and their seed.
    """

    kind: str = "full"
    window: int = 0
    global_tokens: int | tuple[int, ...] = 0
    block: int = 128
    random_blocks: int = 0
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.global_tokens, list | tuple):
            object.__setattr__(self, "global_tokens", tuple(int(p) for p in self.global_tokens))
        problem = pattern_problem(
            self.kind, self.window, self.global_tokens, self.block, self.random_blocks, self.seed
        )
        if problem:
            raise ValueError(f"attention pattern {self.kind!r}: {problem}.")

    @property
    def window_blocks(self) -> int:
        """BigBird: key blocks fewer than this many blocks away are in the window."""
        return self.window // self.block

    @property
    def global_blocks(self) -> int:
        """BigBird: the first this many blocks are global."""
        return self.global_tokens // self.block if isinstance(self.global_tokens, int) else 0


def pattern_problem(kind, window, global_tokens, block, random_blocks, seed) -> str | None:
    """What is wrong with these `AttentionPattern` fields and how to fix it, or None."""
    if kind not in PATTERNS:
        return f"use one of {PATTERNS}"
    g = global_tokens
    if not (g >= 0 if isinstance(g, int) else all(x >= 0 for x in g)):
        return f"global_tokens={g!r}: use a count >= 0 or a tuple of positions >= 0"
    if g and kind not in ("longformer", "bigbird"):
        return f"global_tokens={g!r} is for longformer and bigbird: set it to 0"
    if random_blocks and kind != "bigbird":
        return f"random_blocks={random_blocks} is for bigbird: set it to 0"
    if kind == "full":
        return None
    if window <= 0:
        return f"window={window}: set a positive window (the chunk length for chunked)"
    if kind != "bigbird":
        return None
    if block <= 0 or window % block or not isinstance(g, int) or g % block:
        return f"window={window} and global_tokens={g!r} must be multiples of the block={block} (> 0)"
    if random_blocks < 0 or seed < 0:
        return f"random_blocks={random_blocks} and seed={seed} must be >= 0"
    return None


def _grid(q_positions: Array, kv_positions: Array) -> tuple[Array, Array]:
    """[B, T], [B, S] -> query positions [B, 1, T, 1] and key positions [B, 1, 1, S]."""
    return q_positions[:, None, :, None], kv_positions[:, None, None, :]


def _near(q, k, window: int):
    """|q - k| < window, without abs (operators only: numpy, jax, or inside a Pallas kernel)."""
    return (q - k < window) & (k - q < window)


def _is_global(x, global_tokens: int | tuple[int, ...]):
    """x is a global position: x < G, or x one of the listed positions."""
    if isinstance(global_tokens, int):
        return x < global_tokens
    return functools.reduce(lambda acc, p: acc | (x == p), global_tokens, x < 0)


def local_mask(
    q_positions: Int[Array, "B T"], kv_positions: Int[Array, "B S"], window: int, *, left_only: bool = False
) -> Bool[Array, "B 1 T S"]:
    """[B, T], [B, S] -> [B, 1, T, S]: keys fewer than `window` positions away (left_only: and not after)."""
    q, k = _grid(q_positions, kv_positions)
    return _near(q, k, window) & (k <= q) if left_only else _near(q, k, window)


def longformer_mask(
    q_positions: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"],
    window: int,
    global_tokens: int | tuple[int, ...],
) -> Bool[Array, "B 1 T S"]:
    """[B, T], [B, S] -> [B, 1, T, S]: the local window, plus global rows and columns.

    global_tokens: the first G positions, or a tuple of positions.
    """
    q, k = _grid(q_positions, kv_positions)
    return _near(q, k, window) | _is_global(q, global_tokens) | _is_global(k, global_tokens)


def chunked_mask(
    q_positions: Int[Array, "B T"], kv_positions: Int[Array, "B S"], chunk: int
) -> Bool[Array, "B 1 T S"]:
    """[B, T], [B, S] -> [B, 1, T, S]: queries see the keys of their own chunk of `chunk` positions."""
    q, k = _grid(q_positions, kv_positions)
    return q // chunk == k // chunk


def bigbird_random_blocks(
    num_blocks: int,
    *,
    window_blocks: int,
    global_blocks: int,
    random_blocks: int,
    seed: int,
    causal: bool,
) -> np.ndarray:
    """int32 [num_blocks, random_blocks]: each query block's random key blocks (-1: none left).

    Drawn without replacement among the key blocks outside the window and the global blocks
    (causal: only earlier blocks), from a generator seeded by (seed, query block): a causal row
    does not depend on `num_blocks`, so decoding a longer cache sees the blocks training saw.
    Global query blocks see every block and draw none.
    """
    table = np.full((num_blocks, random_blocks), -1, np.int32)
    j = np.arange(num_blocks)
    for i in range(global_blocks, num_blocks):
        free = (np.abs(i - j) >= window_blocks) & (j >= global_blocks) & ((j <= i) | (not causal))
        candidates = np.flatnonzero(free)
        take = min(random_blocks, candidates.size)
        table[i, :take] = np.random.default_rng((seed, i)).choice(candidates, size=take, replace=False)
    return table


@functools.lru_cache(maxsize=32)
def bigbird_block_map(pattern: AttentionPattern, num_blocks: int, causal: bool) -> np.ndarray:
    """bool [num_blocks, num_blocks]: which key blocks each query block sees (before causality)."""
    i, j = np.arange(num_blocks)[:, None], np.arange(num_blocks)[None, :]
    g = pattern.global_blocks
    seen = (np.abs(i - j) < pattern.window_blocks) | (i < g) | (j < g)
    table = bigbird_random_blocks(
        num_blocks,
        window_blocks=pattern.window_blocks,
        global_blocks=g,
        random_blocks=pattern.random_blocks,
        seed=pattern.seed,
        causal=causal,
    )
    rows = np.broadcast_to(i, table.shape)
    seen[rows[table >= 0], table[table >= 0]] = True
    seen.setflags(write=False)  # cached: shared by every caller
    return seen


def bigbird_mask(
    q_positions: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"],
    *,
    block: int,
    window: int,
    global_tokens: int = 0,
    random_blocks: int = 0,
    seed: int = 0,
    causal: bool = False,
) -> Bool[Array, "B 1 T S"]:
    """[B, T], [B, S] -> [B, 1, T, S]: BigBird's window, global and random blocks (see the module).

    causal: draw the random blocks among earlier blocks only (a decoder); causality itself is
    ANDed by the caller (`causal_mask`, or `pattern_mask(..., causal=True)`).
    """
    pattern = AttentionPattern("bigbird", window, global_tokens, block, random_blocks, seed)
    n = num_blocks(pattern, q_positions.shape[1], kv_positions.shape[1])
    block_map = jnp.asarray(bigbird_block_map(pattern, n, causal))
    q, k = _grid(q_positions, kv_positions)
    return block_map[q // block, k // block]


def num_blocks(pattern: AttentionPattern, q_len: int, kv_len: int) -> int:
    """BigBird's blocks per row for lengths T, S: ceil(max(T, S) / block)."""
    return math.ceil(max(q_len, kv_len) / pattern.block)


def pattern_rule(pattern: AttentionPattern, q, k, *, causal: bool, block_map=None):
    """Elementwise "query position q may see key position k" on broadcastable integer arrays.

    Operators only, so it runs on numpy, on jax arrays and inside a Pallas kernel. The diagonal
    is always on. block_map: bigbird's [blocks, blocks] map (numpy or jax), looked up at
    (q // block, k // block); None leaves bigbird's block-level part out, which is exact inside
    splash, whose blocks divide bigbird's and skip every block the map rules out.
    """
    kind = pattern.kind
    seen = (q == k) | (q != k)  # all True, of the broadcast shape
    if kind == "local":
        seen = _near(q, k, pattern.window)
    elif kind == "longformer":
        g = pattern.global_tokens
        seen = _near(q, k, pattern.window) | _is_global(q, g) | _is_global(k, g)
    elif kind == "chunked":
        seen = q // pattern.window == k // pattern.window
    elif kind == "bigbird" and block_map is not None:
        seen = block_map[q // pattern.block, k // pattern.block]
    seen = seen | (q == k)
    return seen & (k <= q) if causal else seen


def block_is_empty(
    pattern: AttentionPattern, q_range: range, k_range: range, *, causal: bool, block_map=None
) -> bool:
    """True only if no query of `q_range` may see a key of `k_range` (a sound test on whole blocks:
    False may still be an empty block). Lets splash's mask processing skip evaluating most blocks."""
    q0, q1, k0, k1 = q_range.start, q_range.stop - 1, k_range.start, k_range.stop - 1
    if causal and k0 > q1:
        return True
    if q0 <= k1 and k0 <= q1:  # the diagonal crosses the block
        return False
    gap = max(k0 - q1, q0 - k1)  # the nearest pair's distance (> 0 here)
    kind, g = pattern.kind, pattern.global_tokens
    if kind == "local":
        return gap >= pattern.window
    if kind == "longformer":
        has_global = (lambda r: r.start < g) if isinstance(g, int) else (lambda r: any(p in r for p in g))
        return gap >= pattern.window and not has_global(q_range) and not has_global(k_range)
    if kind == "chunked":
        c = pattern.window
        return q1 // c < k0 // c or k1 // c < q0 // c
    if kind == "bigbird" and block_map is not None:
        b = pattern.block
        return not block_map[q0 // b : q1 // b + 1, k0 // b : k1 // b + 1].any()
    return False


def pattern_mask(
    pattern: AttentionPattern | None,
    q_positions: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"],
    *,
    causal: bool = False,
) -> Bool[Array, "B 1 T S"] | None:
    """[B, T], [B, S] positions -> [B, 1, T, S]: the pattern (diagonal on), AND causal if asked.

    None for the full pattern without causality (no constraint). Positions must be row indices
    below max(T, S) (bigbird looks its blocks up in a map of that many positions).
    """
    if pattern is None or pattern.kind == "full":
        return _causal(q_positions, kv_positions) if causal else None
    q, k = _grid(q_positions, kv_positions)
    block_map = None
    if pattern.kind == "bigbird":
        n = num_blocks(pattern, q_positions.shape[1], kv_positions.shape[1])
        block_map = jnp.asarray(bigbird_block_map(pattern, n, causal))
    return pattern_rule(pattern, q, k, causal=causal, block_map=block_map)


def _causal(q_positions: Array, kv_positions: Array) -> Array:
    q, k = _grid(q_positions, kv_positions)
    return k <= q
