"""Checksums of array trees, computed where the arrays live: saved with a checkpoint, checked on
restore together with `check_finite` (no NaN or inf in a restored floating-point array).

orbax/tensorstore write the bytes they are given and read back whatever the files hold: bytes
changed in place (a bad disk, a stray write) come back as other numbers (NaN weights, Adam moments
of 1e38) without an error. `tree_checksums` is one jitted pass over each array, over its values'
bit patterns as 32-bit words w_i (8- and 16-bit values zero-extended, 64-bit values as two words,
i the C-order flat index), giving two 32-bit sums modulo 2**32 stored as one 64-bit number:

    a = sum_i w_i * (2 i + 1)             b = sum_i fmix32(w_i + i * 2654435761)

What is guaranteed: **any change confined to one word (any of its bits, e.g. a flipped sign, a NaN
written over one value) changes both sums**, because each term is a bijection of its word modulo
2**32: multiplication by an odd number is invertible modulo 2**32, and so are adding a constant
and MurmurHash3's `fmix32` finaliser (xor-shifts and odd multiplications). Several changed words
pass only if both sums happen to cancel: `a` is linear, `b` is not (a swapped pair of values or a
block of them moved changes it unless fmix32's outputs collide), so a random change passes with
probability about 2**-64. Integer sums do not depend on the order of the reduction, so the value is
the same for any sharding, device count or process count.

Version 1 (checkpoints written before issue 38) weighted w_i by `i * 2654435761 + 1`, which is even
for every odd i: the sign bit of every odd-indexed value never counted. Those checkpoints carry no
`version` in their checksums item; they are still checked, with the version-1 sum they were saved
with (`tree_checksums(tree, version=1)`), so they restore as before and are not called damaged; the
non-finite check on restore (`checkpoint.py`) catches the NaN that sum can miss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

VERSION = 2  # stored as the checksums item's "version"; absent means 1

# Knuth's multiplicative hash constant. numpy, not jnp: importing this module must not start JAX's
# backend (jax.distributed.initialize has to come first).
_WEIGHT = np.uint32(2654435761)
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _words(x: jax.Array) -> jax.Array:
    """The bit patterns of `x` as uint32 words (64-bit values as a trailing axis of two)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if x.dtype.itemsize == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    unsigned = _UNSIGNED[x.dtype.itemsize]
    words = x if x.dtype == unsigned else jax.lax.bitcast_convert_type(x, unsigned)
    return words.astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """uint32 C-order flat index of every element, from iotas, not a reshape: a reshape of an array
    sharded on a later axis would gather it whole onto every device."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit into every bit."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _checksum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two uint32 sums (a, b) of the module docstring."""
    words = _words(x)
    index = _flat_index(words.shape)
    a = jnp.sum(words * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum(_fmix32(words + index * _WEIGHT), dtype=jnp.uint32)
    return a, b


def _checksum_v1(x: jax.Array) -> jax.Array:
    """Version 1: uint32 sum of w_i * (i * 2654435761 + 1), for checkpoints saved with it."""
    words = _words(x)
    return jnp.sum(words * (_flat_index(words.shape) * _WEIGHT + np.uint32(1)), dtype=jnp.uint32)


@functools.partial(jax.jit, static_argnums=1)
def _checksums(leaves: list, version: int) -> list:
    return [_checksum(x) if version >= 2 else _checksum_v1(x) for x in leaves]


def tree_checksums(tree, version: int = VERSION) -> dict[str, list]:
    """{path: [checksum, dtype name]} of every array in `tree` (paths as jax.tree_util.keystr); the
    checksum is a*2**32 + b (version 2) or the version-1 sum."""
    if version not in (1, 2):
        raise ValueError(f"unknown checksum version {version}")
    pairs = jax.tree_util.tree_leaves_with_path(tree)
    if not pairs:
        return {}
    paths, leaves = zip(*pairs, strict=True)
    values = jax.device_get(_checksums(list(leaves), version))
    if version >= 2:
        values = [(int(a) << 32) | int(b) for a, b in values]
    return {
        jax.tree_util.keystr(p): [int(v), str(x.dtype)] for p, v, x in zip(paths, values, leaves, strict=True)
    }


@jax.jit
def _finite_flags(tree) -> list:
    return [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]


def check_finite(items: dict) -> None:
    """Raise if a floating-point array of the restored `items` ({name: tree}) holds a NaN or inf.

    A step whose checksums match its files can still hold NaN (saved so, or damaged before the
    checksums caught every change): restoring it would fail at the next step or evaluate to NaN, so
    it is treated as damaged. One jitted pass, one flag per array."""
    pairs = [
        (f"{name}{jax.tree_util.keystr(p)}", x)
        for name, tree in items.items()
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not pairs:
        return
    flags = jax.device_get(_finite_flags([x for _, x in pairs]))
    bad = [path for (path, _), ok in zip(pairs, flags, strict=True) if not ok]
    if bad:
        raise ValueError(
            f"{bad[0]} holds NaN or inf values" + (f" ({len(bad)} arrays do)" if len(bad) > 1 else "")
        )


def first_difference(saved: dict[str, list], restored: dict[str, list]) -> str | None:
    """The first path whose checksum differs (or is missing), or None if all match. A leaf restored
    as another dtype than it was saved in (orbax casts to the target's, e.g. bf16 params for
    inference) cannot be compared and is skipped."""
    for path, (value, dtype) in saved.items():
        if path not in restored:
            return path
        got, got_dtype = restored[path]
        if got_dtype == dtype and got != value:
            return path
    return None
