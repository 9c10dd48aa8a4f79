"""Checkpoint checksums (checksums.py): equal to a numpy transcription of the formula for any sharding,
every single-bit flip of every word caught, and checkpoints saved with the version-1 sum still read."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxformer_lite as fl
from flaxformer_lite import sharding, tasks
from flaxformer_lite.train import checkpoint, checksums, training

MASK = 2**32 - 1


def _numpy_words(x) -> np.ndarray:
    """uint64 copies of the 32-bit words of `x` in C order (8/16-bit values zero-extended)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
    return x.view(unsigned).ravel().astype(np.uint64)


def _numpy_fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & MASK
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & MASK
    return h ^ (h >> 16)


def _numpy_checksum(x) -> int:
    """a * 2**32 + b of checksums.py's docstring, in numpy with explicit modular arithmetic."""
    w = _numpy_words(x)
    i = np.arange(w.size, dtype=np.uint64)
    a = int((w * (2 * i + 1) & MASK).sum() & MASK)
    b = int(_numpy_fmix32((w + i * 2654435761) & MASK).sum() & MASK)
    return (a << 32) | b


def _checksum(x) -> int:
    return checksums.tree_checksums({"x": x})["['x']"][0]


def test_checksums_equal_numpy_for_any_sharding():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 6)).astype(np.float32)
    b = rng.standard_normal((12,)).astype(jnp.bfloat16)
    c = rng.integers(-100, 100, (4, 2, 3), dtype=np.int8)
    want = {
        "['a']": [_numpy_checksum(a), "float32"],
        "['b']": [_numpy_checksum(np.asarray(b)), "bfloat16"],
        "['c']": [_numpy_checksum(c), "int8"],
        "['n']": [_numpy_checksum(np.int32(7)), "int32"],
    }
    assert checksums.tree_checksums({"a": a, "b": b, "c": c, "n": np.int32(7)}) == want
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    sharded = {
        "a": jax.device_put(a, NamedSharding(mesh, P("x", "y"))),
        "b": jax.device_put(b, NamedSharding(mesh, P("x"))),
        "c": jax.device_put(c, NamedSharding(mesh, P("y", None, None))),
        "n": np.int32(7),
    }
    assert checksums.tree_checksums(sharded) == want


def _flips(x: np.ndarray):
    """(word index, bit, x with that one bit flipped) for every bit of every element of `x`."""
    bits = x.dtype.itemsize * 8
    unsigned = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])
    for k in range(x.size):
        for bit in range(bits if x.dtype != np.bool_ else 1):
            flipped = unsigned.copy()
            flipped.flat[k] ^= flipped.dtype.type(1 << bit)
            yield k, bit, flipped.view(x.dtype)


DTYPES = [np.float32, jnp.bfloat16, np.float16, np.int32, np.uint32, np.int8, np.uint8, np.bool_]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_single_bit_flip_of_every_word_changes_both_sums(dtype):
    """[4, 5]: flat indices 0..19, among them 8 and 16 (the version-1 weights dropped the most bits there)."""
    rng = np.random.default_rng(1)
    if jnp.issubdtype(dtype, jnp.floating):  # bfloat16 is numpy kind "V"
        x = rng.standard_normal((4, 5)).astype(dtype)
    elif dtype == np.bool_:
        x = rng.integers(0, 2, (4, 5)).astype(np.bool_)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, (4, 5), dtype=dtype, endpoint=True)
    base = _checksum(x)
    sums = {(k, bit): _checksum(flipped) for k, bit, flipped in _flips(x)}
    missed = [flip for flip, got in sums.items() if got == base]
    assert not missed, (
        f"flips of (word, bit) {missed[:10]} left the checksum unchanged ({len(missed)} in all)"
    )
    half = [flip for flip, got in sums.items() if got >> 32 == base >> 32 or got & MASK == base & MASK]
    assert not half, f"flips of (word, bit) {half[:10]} left one of the two sums unchanged"


def test_64_bit_values_are_two_words_each_caught():
    with jax.enable_x64(True):
        x = np.random.default_rng(2).standard_normal((3, 2))  # float64
        base = _checksum(x)
        assert base == _numpy_checksum(x)
        missed = [(k, bit) for k, bit, flipped in _flips(x) if _checksum(flipped) == base]
    assert not missed, missed[:10]


def test_the_sign_of_odd_indexed_embedding_values_counts():
    """The report's case: 1,000 odd-indexed values of an embedding negated (version 1 saw no change)."""
    x = np.random.default_rng(3).standard_normal((64, 40)).astype(np.float32)
    changed = x.copy()
    changed.flat[1:2001:2] *= -1
    assert _checksum(changed) != _checksum(x)
    v1 = checksums.tree_checksums({"x": x}, version=1)
    assert checksums.tree_checksums({"x": changed}, version=1) == v1  # what the old sum missed


def test_a_swapped_pair_of_values_changes_the_checksum():
    x = np.random.default_rng(4).standard_normal((8, 6)).astype(np.float32)
    swapped = x.copy()
    swapped[0, 0], swapped[1, 1] = x[1, 1], x[0, 0]
    want = checksums.tree_checksums({"a": x})
    assert checksums.first_difference(want, checksums.tree_checksums({"a": swapped})) == "['a']"


# ---- checkpoints saved with version 1 (no "version" in their checksums item)


@pytest.fixture()
def saved_state(tmp_path):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = fl.DecoderOnly(fl.tiny())
    shape = (2, 8)
    state, shardings = training.create_train_state(
        model, optax.adam(1e-3), jax.random.key(0), tasks.LM, shape, mesh
    )
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, async_save=False)
    ckpt.save(3, state)
    ckpt.close()
    return (
        state,
        checkpoint.abstract_like(state, shardings),
        training.abstract_params(model, tasks.LM, shape, mesh),
    )


def _rewrite_checksums(directory, step, content: dict):
    """Replace the JSON of a step's checksums item, as a version-1 writer would have left it."""
    with open(os.path.join(directory, str(step), "checksums", "metadata"), "w") as f:  # orbax's JSON item
        json.dump(content, f)


def test_a_checkpoint_with_version_1_checksums_restores_and_is_still_checked(saved_state, tmp_path):
    state, abstract, abstract_params = saved_state
    opt = {"step": state.step, "opt_state": state.opt_state}
    v1 = {
        name: checksums.tree_checksums(tree, version=1)
        for name, tree in (("params", state.params), ("opt", opt))
    }
    _rewrite_checksums(tmp_path, 3, v1)
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1)
    step, restored = ckpt.restore(abstract)
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(state.params))
    # The version-1 sums are compared, not ignored: sums of other values make the step unreadable.
    other = jax.tree.map(lambda x: x + 1, state.params)
    _rewrite_checksums(tmp_path, 3, {"params": checksums.tree_checksums(other, version=1)})
    with pytest.raises(ValueError, match="none of the checkpoints"):
        ckpt.restore_params(abstract_params)
    ckpt.close()
