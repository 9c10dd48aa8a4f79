"""Context parallelism (ops/context_parallel.py) on the 8 fake CPU devices, against the single-device
model and the plain einsum attention; the TPU compiler's collectives (slow tier, libtpu).

Meshes are data x fsdp x context x tensor. Rows are tiny (T = 32) and hold padding and packed
documents with per-document positions, so a mask by index instead of by original position, or a
leak between documents, changes the numbers.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flaxformer_lite as fl
from flaxformer_lite import ops, sharding, tasks
from flaxformer_lite.ops import context_parallel as cp
from flaxformer_lite.train import training

T = 32


def _rows(kind: str, vocab: int = 67, seed: int = 0) -> dict:
    """Two LM rows of T tokens: "padded" (20 and 32 real tokens) or "packed" (documents of 10, 15
    and padding; 7, 25)."""
    lengths = {"padded": [[20], [32]], "packed": [[10, 15], [7, 25]]}[kind]
    rng = np.random.default_rng(seed)
    seg, pos = np.zeros((2, T), np.int32), np.zeros((2, T), np.int32)
    for r, docs in enumerate(lengths):
        start = 0
        for d, n in enumerate(docs):
            seg[r, start : start + n], pos[r, start : start + n] = d + 1, np.arange(n)
            start += n
    tokens = np.where(seg > 0, rng.integers(4, vocab, (2, T)), 0).astype(np.int32)
    return {"targets": tokens, "targets_segment_ids": seg, "targets_positions": pos}


def _mesh(data, fsdp, context, tensor):
    n = data * fsdp * context * tensor
    return sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:n], context=context)


def _loss_and_grads(mesh, batch, strategy="all_gather", load_balance=0, **cfg):
    """(loss sum, grads) of a tiny decoder-only LM's token-level loss, jitted over `mesh`."""
    model = fl.DecoderOnly(fl.tiny(max_len=T, context_strategy=strategy, **cfg))
    params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(batch["targets"]))["params"])

    def loss(params, batch):
        total, _ = training.loss_sums(
            params, batch, jax.random.key(1), model=model, task=tasks.LM, load_balance=load_balance
        )
        return total

    with jax.set_mesh(mesh):
        fn = jax.jit(sharding.under_rules(jax.value_and_grad(loss)))
        return jax.device_get(fn(params, {k: jnp.asarray(v) for k, v in batch.items()}))


def _assert_same(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6)


# ------------------------------------------------------------------------------ load balancing


def test_load_balance_order_is_the_dual_chunk_swap_and_its_inverse_is_exact():
    C = 4
    order = cp.load_balance_order(T, C)
    chunks = order.reshape(2 * C, T // (2 * C))[:, 0] // (T // (2 * C))  # chunk number of each piece
    assert chunks.tolist() == [0, 7, 1, 6, 2, 5, 3, 4]  # shard i: chunks i and 2C-1-i
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, T, 3)))
    back = cp.reorder(cp.reorder(x, order), cp.inverse_order(order))
    np.testing.assert_array_equal(back, x)
    batch = _rows("packed")
    moved, _ = training.load_balanced({k: jnp.asarray(v) for k, v in batch.items()}, None, C)
    for key in batch:  # every token keeps its own (original) position and segment id
        np.testing.assert_array_equal(moved[key], batch[key][:, order])
    with pytest.raises(ValueError, match="divisible by 8"):
        cp.load_balance_order(36, 4)


def test_load_balancing_equalises_causal_work():
    """Counted pairs of a causal mask, by hand: shard i of C in order has (2i+1) * (T/C)^2 / 2 + ...;
    after the swap every shard has the same count."""
    C, pos, seg = 4, np.arange(T), np.ones(T, np.int32)
    plain = cp.causal_work(pos, seg, C)
    n = T // C
    assert plain.tolist() == [n * (n + 1) // 2 + i * n * n for i in range(C)]
    order = cp.load_balance_order(T, C)
    balanced = cp.causal_work(pos[order], seg[order], C)
    assert len(set(balanced.tolist())) == 1 and balanced.sum() == plain.sum() == T * (T + 1) // 2


# ------------------------------------------------------------------------------ the attention op


@pytest.mark.parametrize("strategy", cp.STRATEGIES)
def test_attention_and_its_gradients_match_the_einsum_reference(strategy):
    """Packed rows in the load-balanced order over context=8 (one chunk of 2 per shard piece):
    outputs and q/k/v gradients equal the plain causal attention of the original order."""
    B, N, K, H, C = 2, 4, 2, 6, 8
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    rows = _rows("packed")
    seg, pos = jnp.asarray(rows["targets_segment_ids"]), jnp.asarray(rows["targets_positions"])
    order, mesh = cp.load_balance_order(T, C), _mesh(1, 1, C, 1)
    weights = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)

    def reference(q, k, v):
        out = ops.dot_product_attention(q, k, v, is_causal=True, segment_ids=seg, implementation="reference")
        return jnp.sum(out * weights), out

    def sharded(q, k, v):
        r = lambda x: cp.reorder(x, order)  # noqa: E731
        out = cp.context_parallel_attention(
            r(q), r(k), r(v), mesh=mesh, strategy=strategy, is_causal=True, positions=r(pos),
            segment_ids=r(seg), chunk=2,
        )  # fmt: skip
        out = cp.reorder(out, cp.inverse_order(order))
        return jnp.sum(out * weights), out

    (_, want), want_grads = jax.value_and_grad(reference, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    with jax.set_mesh(mesh):
        (_, got), got_grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-5)


# ------------------------------------------------------------------------------ the model


# The default tier: one case per mesh; every combination in the slow tier.
FAST = [
    ((1, 1, 8, 1), "ring", "packed", True),
    ((2, 1, 2, 2), "all_gather", "padded", False),
]
ALL = [
    (mesh, strategy, kind, balance)
    for mesh in ((1, 1, 8, 1), (2, 1, 2, 2))
    for strategy in cp.STRATEGIES
    for kind, balance in (("padded", False), ("packed", False), ("packed", True))
]
SLOW = [pytest.param(*case, marks=pytest.mark.slow) for case in ALL if case not in FAST]


@pytest.mark.parametrize("mesh, strategy, kind, balance", FAST + SLOW)
def test_loss_and_gradients_equal_the_single_device_step(mesh, strategy, kind, balance):
    batch = _rows(kind)
    want = _loss_and_grads(_mesh(1, 1, 1, 1), batch, position="rope")
    load_balance = mesh[2] if balance else 0
    got = _loss_and_grads(_mesh(*mesh), batch, strategy, load_balance, position="rope")
    _assert_same(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_absolute_positions_follow_the_reordered_tokens(position):
    batch = _rows("packed")
    want = _loss_and_grads(_mesh(1, 1, 1, 1), batch, position=position)
    got = _loss_and_grads(_mesh(1, 1, 4, 1), batch, "ring", 4, position=position)
    _assert_same(got, want)


def test_a_packed_document_never_sees_another():
    """Row 0 packs documents of 10 and 15 tokens: new tokens in the first leave the second's logits
    exactly as they were (ring over context=4: the documents meet on every hop)."""
    batch = _rows("packed")
    model = fl.DecoderOnly(fl.tiny(max_len=T, context_strategy="ring", position="rope"))
    params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(batch["targets"]))["params"])
    mesh = _mesh(1, 1, 4, 1)
    seg, pos = jnp.asarray(batch["targets_segment_ids"]), jnp.asarray(batch["targets_positions"])
    apply = lambda p, t: model.apply({"params": p}, t, segment_ids=seg, positions=pos)  # noqa: E731
    logits = jax.jit(sharding.under_rules(apply))
    changed = batch["targets"].copy()
    changed[0, :10] = (changed[0, :10] + 5) % 60 + 4
    with jax.set_mesh(mesh):
        a, b = (np.asarray(logits(params, jnp.asarray(t))) for t in (batch["targets"], changed))
    np.testing.assert_array_equal(a[0, 10:25], b[0, 10:25])
    assert np.abs(a[0, :10] - b[0, :10]).max() > 1e-3  # the changed document itself did change


def test_run_settings_are_checked_in_one_line():
    from configs import default

    config = default.get_config()
    config.task, config.max_length = "lm", 36
    for fields, message in (
        (dict(mesh_context=8), "max_length=36 must be a multiple of mesh_context=8"),
        (dict(mesh_context=1, context_load_balance=True), "needs mesh_context > 1"),
        (dict(mesh_context=4, context_load_balance=True), "divisible by 2 x mesh_context = 8"),
        (dict(context_strategy="tree"), "context_strategy='tree'"),
    ):
        trial = config.copy_and_resolve_references()
        trial.update(fields)
        with pytest.raises(ValueError, match=message):
            training.check_context(trial, tasks.get("lm"))
    with pytest.raises(ValueError, match="no logit bias or attention dropout"):
        _loss_and_grads(_mesh(1, 1, 2, 1), _rows("padded"), position="alibi")


# ------------------------------------------------------------------------------ the TPU compiler


@pytest.mark.slow
@pytest.mark.tpu_aot
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the tpu-aot extra (libtpu)")
@pytest.mark.parametrize(
    "strategy, collective", [("all_gather", "all-gather"), ("ring", "collective-permute")]
)
def test_train_step_compiles_for_tpu_with_the_strategys_collective(strategy, collective):
    from configs import quickstart  # noqa: F401  (the config file the aot tests use)
    from flaxformer_lite.tools import aot, aot_targets

    config = quickstart.get_config()
    config.task, config.dataset_name, config.model.preset = "lm", "bible_lm", "tiny"
    config.update(dict(max_length=512, batch_size=1, mesh_data=1, mesh_context=4, context_strategy=strategy))
    config.update(dict(context_load_balance=True))
    config.model.overrides.position = "rope"
    target = aot_targets.parse("tpu:v5e:2x2")
    devices = aot_targets.devices(target)
    exp = aot.build(config, devices)
    program = aot.train_program(exp)
    compiled, _ = aot.compile_program(program, exp, target)
    assert aot.collectives(compiled).get(collective, 0) > 0
    assert exp.mesh.shape["context"] == 4
