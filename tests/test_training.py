import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxformer_lite as fl
from flaxformer_lite import ops, sharding, tasks
from flaxformer_lite.train import training


def test_noam_schedule_matches_formula():
    sched = training.noam_schedule(d_model=512, warmup_steps=4000)
    for step in (1, 10, 3999, 4000, 4001, 20_000):
        want = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
        assert float(sched(step - 1)) == pytest.approx(want, rel=1e-5)  # optax counts from 0
    peak = training.noam_schedule(512, 4000)(3999)
    assert float(peak) == pytest.approx(512**-0.5 * 4000**-0.5, rel=1e-5)


def test_warmup_cosine_schedule_shape():
    sched = training.warmup_cosine_schedule(1e-3, warmup_steps=10, total_steps=110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-4)  # half-way in the cosine
    assert float(sched(110)) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="schedule 'linear' is unknown"):
        training.make_schedule("linear", d_model=8, learning_rate=1.0, warmup_steps=1, total_steps=2)


def _batch(task, batch_size=8, length=10, seed=0, vocab=67):
    """Random padded batch: row i has length - (i % 4) real tokens."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("inputs", "targets") if task == "translation" else ("targets",):
        lengths = length - (np.arange(batch_size) % 4) - (1 if name == "inputs" else 0)
        valid = np.arange(length)[None] < lengths[:, None]
        tokens = rng.integers(4, vocab, (batch_size, length))
        if task == "mlm":  # a masked token follows from its neighbours: something to learn
            tokens = 4 + (3 * np.arange(length)[None] + np.arange(batch_size)[:, None]) % (vocab - 4)
        out[name] = np.where(valid, tokens, 0).astype(np.int32)
        out[f"{name}_segment_ids"] = valid.astype(np.int32)
        out[f"{name}_positions"] = np.where(valid, np.arange(length)[None], 0).astype(np.int32)
    return out


def _setup(task, mesh, *, accum=1, lr=3e-3, vocab=67, batch_size=8, sgd=False, **cfg):
    task = tasks.get(task)
    model = task.model_class(fl.tiny(vocab_size=vocab, **cfg))
    schedule = training.make_schedule("constant", d_model=24, learning_rate=lr, warmup_steps=1, total_steps=1)
    tx = optax.sgd(schedule) if sgd else training.make_optimizer(schedule, clip_norm=None)
    state, shardings = training.create_train_state(model, tx, jax.random.key(0), task, (batch_size, 10), mesh)
    step = functools.partial(
        training.train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        task=task,
        label_smoothing=0.1,
        grad_accum_steps=accum,
    )
    bs = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        jitted = jax.jit(
            step, in_shardings=(shardings, bs, None), out_shardings=(shardings, None), donate_argnums=0
        )
    return state, jitted


def _run(task, mesh, steps, **kwargs):
    state, step = _setup(task, mesh, **kwargs)
    losses = []
    with jax.set_mesh(mesh):
        for i in range(steps):
            batch = sharding.global_batch(_batch(task, seed=i % 2, vocab=kwargs.get("vocab", 67)), mesh)
            state, metrics = step(state, batch, jax.random.key(1))
            losses.append(float(metrics["loss"]))
    return state, losses


def _single_device_mesh():
    return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.mark.parametrize("task", ["translation", "lm", "mlm"])
def test_tiny_run_loss_falls(task):
    _, losses = _run(task, _single_device_mesh(), 70 if task == "mlm" else 25)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_gradient_accumulation_equals_one_big_batch():
    mesh = _single_device_mesh()
    # SGD, so params move by exactly -lr * gradient (Adam would amplify round-off in zero-gradient
    # params such as the key bias, whose gradient is exactly 0 in real arithmetic).
    one, _ = _run("translation", mesh, 3, sgd=True, lr=0.5)
    accum, _ = _run("translation", mesh, 3, sgd=True, lr=0.5, accum=4)  # 4 micro-batches, unequal padding
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), one.params, accum.params
    )


def test_fsdp_and_tensor_parallel_match_single_device():
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)  # the 2x4 (tensor x fsdp) part of 8 fake devices
    assert mesh.devices.shape == (1, 4, 1, 2)  # data, fsdp, context, tensor
    sharded_state, sharded = _run("translation", mesh, 4, vocab=68)
    _, single = _run("translation", _single_device_mesh(), 4, vocab=68)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    wi = sharded_state.params["encoder"]["layer_0"]["mlp"]["wi"]["kernel"]  # [embed, mlp]
    assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(wi.addressable_shards) == 8 and wi.addressable_shards[0].data.shape == (6, 20)


def test_mesh_sizes_are_validated():
    assert sharding.mesh_shape(8, data=-1, fsdp=2, tensor=2) == (2, 2, 1, 2)  # data, fsdp, context, tensor
    assert sharding.mesh_shape(8, data=-1, context=4) == (2, 1, 4, 1)
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.mesh_shape(8, data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="cannot fill 8 devices"):
        sharding.mesh_shape(8, data=-1, fsdp=3)
    with pytest.raises(ValueError, match="set one size to -1"):
        sharding.mesh_shape(8, data=2, fsdp=2, tensor=1)


def test_scheduled_sampling_feeds_model_predictions():
    model = fl.EncoderDecoder(fl.tiny())
    batch = {k: jnp.asarray(v) for k, v in _batch("translation").items()}
    params = model.init(jax.random.key(0), batch["inputs"], batch["targets"])["params"]
    rng = jax.random.key(3)
    gold = ops.shift_right(batch["targets"], batch["targets_segment_ids"])
    never = training._scheduled_sampling_inputs(model, tasks.TRANSLATION, params, batch, rng, 0.0)
    np.testing.assert_array_equal(never, gold)
    logits = model.apply({"params": params}, batch["inputs"], gold)
    preds = np.where(batch["targets_segment_ids"] > 0, np.argmax(logits, -1), 0)
    always = training._scheduled_sampling_inputs(model, tasks.TRANSLATION, params, batch, rng, 1.0)
    np.testing.assert_array_equal(always, ops.shift_right(jnp.asarray(preds), batch["targets_segment_ids"]))
    ramp = training.linear_ramp(0.25, 100)
    assert [float(ramp(jnp.array(s))) for s in (0, 50, 100, 400)] == [0.0, 0.125, 0.25, 0.25]


def test_adamw_decays_matrices_only():
    params = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}
    tx = training.make_optimizer(lambda _: 0.1, weight_decay=0.5, clip_norm=None)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((3, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], np.zeros(2))
