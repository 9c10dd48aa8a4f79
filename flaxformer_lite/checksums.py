"""Checksums of array trees, computed where the arrays live: saved with a checkpoint, checked on restore.

orbax/tensorstore write the bytes they are given and read back whatever the files hold: bytes
changed in place (a bad disk, a stray write) come back as other numbers (NaN weights, Adam moments
of 1e38) without an error. `tree_checksums` is one jitted pass over each array: the sum, modulo
2**32, of its bit patterns times a position weight. Integer sums do not depend on the order of
the reduction, so the value is the same for any sharding, device count or process count; any
changed word changes it (a swapped pair of values too, through the weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Knuth's multiplicative hash constant: odd, so every weight differs. numpy, not jnp: importing this
# module must not start JAX's backend (jax.distributed.initialize has to come first).
_WEIGHT = np.uint32(2654435761)
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _checksum(x: jax.Array) -> jax.Array:
    """uint32 sum over i of bits(x_i) * (i * _WEIGHT + 1), i the C-order flat index (64-bit values as
    two 32-bit words). The index comes from iotas, not a reshape: a reshape of an array sharded on a
    later axis would gather it whole onto every device."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if x.dtype.itemsize == 8:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    else:
        unsigned = _UNSIGNED[x.dtype.itemsize]
        words = x if x.dtype == unsigned else jax.lax.bitcast_convert_type(x, unsigned)
        words = words.astype(jnp.uint32)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (index * _WEIGHT + np.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list) -> list:
    return [_checksum(x) for x in leaves]


def tree_checksums(tree) -> dict[str, list]:
    """{path: [checksum, dtype name]} of every array in `tree` (paths as jax.tree_util.keystr)."""
    pairs = jax.tree_util.tree_leaves_with_path(tree)
    if not pairs:
        return {}
    paths, leaves = zip(*pairs, strict=True)
    values = jax.device_get(_checksums(list(leaves)))
    return {
        jax.tree_util.keystr(p): [int(v), str(x.dtype)] for p, v, x in zip(paths, values, leaves, strict=True)
    }


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
