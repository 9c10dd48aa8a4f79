"""Checkpoint layout: params restore alone (no optimizer state read), 0.1 checkpoints still load, NaN
steps are damaged, and readers racing a training run's checkpoint rotation read the newest step."""

import os
import shutil
import threading

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import flaxformer_lite as fl
from flaxformer_lite import sharding, tasks
from flaxformer_lite.train import checkpoint, training

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


def _with_nan(tree):
    """`tree` with its first floating-point value set to NaN."""
    leaves, treedef = jax.tree.flatten(tree)
    i = next(i for i, x in enumerate(leaves) if np.issubdtype(np.asarray(x).dtype, np.floating))
    leaves[i] = leaves[i].at[(0,) * leaves[i].ndim].set(np.nan)
    return jax.tree.unflatten(treedef, leaves)


def test_a_step_saved_with_nan_is_damaged_for_training_and_for_readers(setup, tmp_path):
    """Checksums that match do not make a NaN step healthy: training moves it aside and resumes from
    the previous step; readers skip a step with NaN params (not one with NaN optimizer state, which
    they do not read) and move nothing."""
    state, abstract, abstract_params = setup
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, async_save=False)
    ckpt.save(1, state)
    ckpt.save(2, state.replace(opt_state=_with_nan(state.opt_state)))  # saved with their checksums
    ckpt.save(3, state.replace(params=_with_nan(state.params)))
    ckpt.close()
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1)
    step, params = ckpt.restore_params(abstract_params)  # readers need the params alone
    assert step == 2 and sorted(os.listdir(tmp_path)) == ["1", "2", "3"]
    _assert_tree_equal(params, state.params)
    step, restored = ckpt.restore(abstract)
    assert step == 1
    _assert_tree_equal(restored, state)
    moved = sorted(d.split(".")[0] for d in os.listdir(tmp_path) if ".corrupt-" in d)
    assert moved == ["2", "3"] and ckpt.steps() == [1]
    ckpt.close()


def test_a_step_rotated_out_while_a_reader_reads_it_is_not_damaged(setup, tmp_path, caplog):
    """eval.py against a running train.py with keep_checkpoints=1: the step listed is deleted before it
    is read (the writer saved a newer one). The reader lists again and reads the newest; no warning."""
    state, _, abstract_params = setup
    newer = state.replace(params=jax.tree.map(lambda x: x + 1, state.params))
    writer = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=1, async_save=False)
    writer.save(2, state)
    reader = checkpoint.Checkpointer(str(tmp_path), save_every=1)
    assert reader.steps() == [2]
    item_metadata = reader.manager.item_metadata

    def metadata_while_the_writer_rotates(step):
        if step == 2 and writer.steps() == [2]:
            writer.save(4, newer)  # keep=1: step 2 is deleted
            assert not os.path.exists(tmp_path / "2")
        return item_metadata(step)

    reader.manager.item_metadata = metadata_while_the_writer_rotates
    step, params = reader.restore_params(abstract_params)
    assert step == 4
    _assert_tree_equal(params, newer.params)
    assert "unreadable" not in caplog.text, caplog.text
    reader.close()
    writer.close()


@pytest.mark.slow
def test_readers_racing_a_rotating_writer_always_read_a_step(setup, tmp_path, caplog):
    """A writer thread saving every step with keep=1 while a reader restores again and again: every
    read returns params of a step the writer saved (step s holds params + s), never an error."""
    state, _, abstract_params = setup
    writer = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=1, async_save=False)
    writer.save(1, state.replace(params=jax.tree.map(lambda x: x + 1, state.params)))
    done = threading.Event()

    def write():
        for s in range(2, 200):
            if done.is_set():
                break
            writer.save(s, state.replace(params=jax.tree.map(lambda x, s=s: x + s, state.params)))

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for _ in range(15):
            reader = checkpoint.Checkpointer(str(tmp_path), save_every=1)
            step, params = reader.restore_params(abstract_params)
            reader.close()
            want = jax.tree.map(lambda x, step=step: x + step, state.params)
            _assert_tree_equal(params, want)
    finally:
        done.set()
        thread.join()
        writer.close()
    assert "unreadable" not in caplog.text, caplog.text
