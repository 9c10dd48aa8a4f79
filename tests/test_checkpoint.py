"""Checkpoint layout: params restore alone (no optimizer state read), and 0.1 checkpoints still load."""

import os
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import flaxformer_lite as fl
from flaxformer_lite import checkpoint, sharding, tasks, training

SHAPE = (4, 8)


@pytest.fixture()
def setup():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = fl.DecoderOnly(fl.tiny())
    tx = optax.adam(1e-3)
    state, shardings = training.create_train_state(model, tx, jax.random.key(0), tasks.LM, SHAPE, mesh)
    state = state.replace(step=state.step + 7, opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
    abstract_params = training.abstract_params(model, tasks.LM, SHAPE, mesh)
    return state, checkpoint.abstract_like(state, shardings), abstract_params


def _assert_tree_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_params_restore_without_the_optimizer_item(setup, tmp_path):
    state, abstract, abstract_params = setup
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, async_save=False)
    ckpt.save(3, state)
    ckpt.close()
    shutil.rmtree(tmp_path / "3" / "opt")  # inference must not need it
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1)
    step, params = ckpt.restore_params(abstract_params)
    assert step == 3
    _assert_tree_equal(params, state.params)
    ckpt.close()


def test_full_state_round_trip(setup, tmp_path):
    state, abstract, _ = setup
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, async_save=False)
    ckpt.save(5, state)
    step, restored = ckpt.restore(abstract)
    ckpt.close()
    assert step == 5 and int(restored.step) == int(state.step)
    _assert_tree_equal(restored, state)


def test_checkpoints_of_version_0_1_still_load(setup, tmp_path):
    """0.1 wrote one `state` item (the whole TrainState); training resumes and eval reads params."""
    state, abstract, abstract_params = setup
    old = ocp.CheckpointManager(str(tmp_path), item_handlers={"state": ocp.StandardCheckpointHandler()})
    old.save(9, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    old.wait_until_finished()
    old.close()
    assert "state" in os.listdir(tmp_path / "9") and "params" not in os.listdir(tmp_path / "9")
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1)
    step, restored = ckpt.restore(abstract)
    assert step == 9
    _assert_tree_equal(restored, state)
    step, params = ckpt.restore_params(abstract_params)
    assert step == 9
    _assert_tree_equal(params, state.params)
    ckpt.close()


def test_another_architecture_is_a_mismatch_not_corruption(setup, tmp_path):
    state, _, _ = setup
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, async_save=False)
    ckpt.save(2, state)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    wider = training.abstract_params(fl.DecoderOnly(fl.tiny(d_ff=48)), tasks.LM, SHAPE, mesh)
    with pytest.raises(
        checkpoint.CheckpointMismatchError,
        match=r"mlp/wi/\w+' has shape \(.*40,?\) in the checkpoint but \(.*48,?\)",
    ):
        ckpt.restore_params(wider)
    assert os.path.isdir(tmp_path / "2")  # not moved aside: it is readable, just not this model's
    ckpt.close()
