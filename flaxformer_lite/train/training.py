"""Train state, optimizer and schedules, and pure train/eval steps (the caller jits them).

Losses are token-weighted: every step sums per-token losses and weights over the whole global
batch (all micro-batches, all devices) and divides once, so k accumulated micro-batches give
exactly the gradient of one batch k times larger.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from flaxformer_lite import ops
from flaxformer_lite.cli import need
from flaxformer_lite.model.models import variant
from flaxformer_lite.ops import context_parallel
from flaxformer_lite.sharding import DEFAULT_RULES, logical_shardings
from flaxformer_lite.tasks import Task
from flaxformer_lite.train import recurrence


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None  # exponential moving average of params, sharded like them (None: off)
    memory: Any = None  # Transformer-XL memory carried from step to step (train/recurrence.py; None: off)


# ------------------------------------------------------------------------------ schedules


def noam_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step counted from 1."""

    def schedule(count):
        step = jnp.maximum(count + 1, 1).astype(jnp.float32)
        return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def warmup_cosine_schedule(peak: float, warmup_steps: int, total_steps: int, end_fraction: float = 0.1):
    """Linear warmup from 0 to `peak`, then cosine decay to `end_fraction * peak` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, max(warmup_steps, 1), max(total_steps, warmup_steps + 1), end_value=peak * end_fraction
    )


def make_schedule(name: str, *, d_model: int, learning_rate: float, warmup_steps: int, total_steps: int):
    """ "noam" (learning_rate scales the formula), "cosine" (learning_rate is the peak) or "constant"."""
    if name == "noam":
        return noam_schedule(d_model, warmup_steps, learning_rate)
    if name == "cosine":
        return warmup_cosine_schedule(learning_rate, warmup_steps, total_steps)
    if name == "constant":
        return optax.constant_schedule(learning_rate)
    raise ValueError(f"schedule {name!r} is unknown; use 'noam', 'cosine' or 'constant'.")


def make_optimizer(
    schedule: optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-9,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Adam (weight_decay 0) or AdamW with decay on matrices only (not norms, biases)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    opt = (
        optax.adamw(schedule, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
        if weight_decay
        else optax.adam(schedule, b1, b2, eps)
    )
    return optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm else opt


# ------------------------------------------------------------------------------ state


def _init_fn(model: nn.Module, tx, task: Task, batch_shape: tuple[int, int], ema: bool = False):
    batch = task.example_batch(*batch_shape)

    def init(rng):
        variables = task.init(model, rng, batch)
        params = variables["params"]
        memory = variables.get(recurrence.MEMORY)  # only with memory_length: empty (document id 0)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
            ema_params=params if ema else None,
            memory=None if memory is None else jax.tree.map(jnp.zeros_like, memory),
        )  # fmt: skip

    return init


def _abstract(init, mesh, rules):
    """(ShapeDtypeStructs carrying shardings, shardings) of what `init(rng)` returns, nothing allocated."""
    key = jax.random.key(0)  # made outside the mesh: nothing may run on a compile-only (AOT) mesh
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init, key)
    shardings = logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    return abstract, shardings


def state_shardings(
    model: nn.Module, tx, task: Task, batch_shape: tuple[int, int], mesh, rules=DEFAULT_RULES, ema=False
):
    """(abstract state, shardings): ShapeDtypeStructs carrying shardings, with nothing allocated."""
    return _abstract(_init_fn(model, tx, task, batch_shape, ema), mesh, rules)


def abstract_params(model: nn.Module, task: Task, batch_shape: tuple[int, int], mesh, rules=DEFAULT_RULES):
    """Params as ShapeDtypeStructs with their shardings (to restore params alone, for inference)."""
    batch = task.example_batch(*batch_shape)
    return _abstract(lambda rng: task.init(model, rng, batch)["params"], mesh, rules)[0]


def create_train_state(
    model: nn.Module, tx, rng, task: Task, batch_shape: tuple[int, int], mesh, rules=DEFAULT_RULES, ema=False
):
    """Initialise params and optimizer state (and, with `ema`, the params' moving average) directly
    sharded on `mesh`. Returns (state, shardings)."""
    init = _init_fn(model, tx, task, batch_shape, ema)
    _, shardings = state_shardings(model, tx, task, batch_shape, mesh, rules, ema)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings


# ------------------------------------------------------------------------------ losses


def _scheduled_sampling_inputs(model, task: Task, params, batch, rng, prob):
    """Decoder inputs where each gold token is replaced by the model's own argmax with `prob`."""
    gold = batch["targets"]
    logits, _, weights = task.forward(model, params, batch, rng)
    preds = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1)).astype(gold.dtype)
    coin = jax.random.bernoulli(jax.random.fold_in(rng, 1), prob, gold.shape) & (weights > 0)
    return ops.shift_right(jnp.where(coin, preds, gold), batch["targets_segment_ids"])


def loss_sums(params, batch, rng, *, model, task, label_smoothing=0.0, sampling_prob=None, load_balance=0):
    """(smoothed loss sum, (weight sum, NLL sum, correct count, extra metric sums)) over a batch.

    Another objective (e.g. `mrt.loss_sums`) returns the same, its own metrics in the dict.
    load_balance: the context axis size C > 1 to feed the model each row in the dual-chunk-swap
    order (decoder inputs shifted first; positions, targets and weights move with their tokens, so
    the summed loss is the same) for equal causal work per device; 0 = the rows as they are."""
    decoder_inputs = None
    if sampling_prob is not None:
        decoder_inputs = _scheduled_sampling_inputs(model, task, params, batch, rng, sampling_prob)
    if load_balance > 1:
        batch, decoder_inputs = load_balanced(batch, decoder_inputs, load_balance)
    logits, targets, weights = task.forward(model, params, batch, rng, decoder_inputs)
    loss, nll, correct, denom = ops.token_losses(logits, targets, weights, label_smoothing)
    return loss, (denom, nll, correct, {})


def load_balanced(batch: dict, decoder_inputs, context: int) -> tuple[dict, jax.Array]:
    """A language model's [B, T] batch and decoder inputs (None: the shifted targets) in
    `ops.context_parallel.load_balance_order(T, context)`: shard i holds chunks i and 2C-1-i."""
    if decoder_inputs is None:
        decoder_inputs = ops.shift_right(batch["targets"], batch["targets_segment_ids"])
    order = context_parallel.load_balance_order(batch["targets"].shape[1], context)
    return jax.tree.map(lambda x: context_parallel.reorder(x, order), (batch, decoder_inputs))


def check_context(config, task: Task) -> None:
    """Context parallelism's run settings: mesh_context, context_strategy, context_load_balance."""
    c, strategies = config.mesh_context, context_parallel.STRATEGIES
    need(c >= 1, f"mesh_context={c} must be >= 1 (1 = the sequence is not split)")
    need(
        config.context_strategy in strategies,
        f"context_strategy={config.context_strategy!r}: use one of {strategies}",
    )
    need(config.max_length % c == 0, f"max_length={config.max_length} must be a multiple of mesh_context={c}")
    if not config.context_load_balance:
        return
    need(c > 1, "context_load_balance needs mesh_context > 1 (it balances the devices that split a sequence)")
    need(
        task.name == "lm" and config.objective == "mle",
        f"context_load_balance is for causal LMs (task='lm', objective='mle'), not task={task.name!r}",
    )
    need(
        config.max_length % (2 * c) == 0,
        f"context_load_balance needs max_length={config.max_length} divisible by 2 x mesh_context = {2 * c}",
    )


# ------------------------------------------------------------------------------ steps


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: Callable,
    task: Task,
    label_smoothing: float = 0.0,
    grad_accum_steps: int = 1,
    sampling_schedule: Callable | None = None,
    ema_decay: float = 0.0,
    objective: Callable | None = None,
    load_balance: int = 0,
) -> tuple[TrainState, dict]:
    """One optimizer update from `batch` (split into `grad_accum_steps` micro-batches); with an
    `ema_params` state, also their moving average (`ema_update`). objective: a loss with
    `loss_sums`'s signature and returns (default: the token-level loss). load_balance: see
    `loss_sums` (the token-level loss only)."""
    step_rng = jax.random.fold_in(rng, state.step)
    prob = None if sampling_schedule is None else sampling_schedule(state.step)
    grad_fn = jax.value_and_grad(
        functools.partial(
            objective or (loss_sums if state.memory is None else recurrence.loss_sums),
            model=model,
            task=task,
            label_smoothing=label_smoothing,
            sampling_prob=prob,
            **({"load_balance": load_balance} if load_balance > 1 else {}),
        ),
        has_aux=True,
    )

    def micro(carry, xs):
        mb, i = xs
        (loss, aux), grads = grad_fn(state.params, mb, jax.random.fold_in(step_rng, i))
        return jax.tree.map(jnp.add, carry, (grads, loss, aux)), None

    k = grad_accum_steps
    if state.memory is not None:  # rows continue the last batch's: so does their memory
        batch = {**batch, recurrence.MEMORY: state.memory}
    if k == 1:  # no scan around a single micro-batch: XLA fuses and reuses buffers across it
        (loss, aux), grads = grad_fn(state.params, batch, jax.random.fold_in(step_rng, 0))
    else:  # [B, ...] -> [k, B/k, ...]; a scan sums micro-batch gradients before the single division
        micro_batches = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        aux_shape = jax.eval_shape(grad_fn, state.params, first, step_rng)[0][1]
        zeros = (
            jax.tree.map(jnp.zeros_like, state.params),
            jnp.zeros(()),
            jax.tree.map(jnp.zeros_like, aux_shape),
        )
        (grads, loss, aux), _ = jax.lax.scan(micro, zeros, (micro_batches, jnp.arange(k)))
    denom, nll, correct, extras = aux
    memory = extras.pop(recurrence.MEMORY, None)
    denom = jnp.maximum(denom, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema_params is None else ema_update(state.ema_params, params, state.step, ema_decay)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, memory=memory
    )
    metrics = {
        "loss": loss / denom,
        "nll": nll / denom,
        "accuracy": correct / denom,
        "grad_norm": optax.tree_utils.tree_norm(grads),
        "learning_rate": schedule(state.step),
        "tokens": denom,
    }
    if prob is not None:
        metrics["sampling_prob"] = prob
    metrics.update({name: value / k for name, value in extras.items()})  # per micro-batch means
    return new_state, metrics


def ema_update(ema, params, step: jax.Array, decay: float):
    """ema <- d * ema + (1 - d) * params with d = min(decay, (1 + step) / (10 + step)): the average
    forgets its random start within the first steps (TensorFlow's ExponentialMovingAverage with
    num_updates). One elementwise pass over the params, fused by XLA with the optimizer update."""
    t = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


def eval_step(params, batch: dict, *, model: nn.Module, task: Task) -> dict:
    """Sums (not means) of NLL, weights and correct tokens, to be added over batches."""
    model = variant(model, deterministic=True)
    nll, (denom, _, correct, _) = loss_sums(params, batch, jax.random.key(0), model=model, task=task)
    return {"nll_sum": nll, "weight_sum": denom, "correct_sum": correct}


def linear_ramp(max_prob: float, ramp_steps: int) -> Callable:
    """Scheduled-sampling probability: 0 at step 0 rising linearly to `max_prob` at `ramp_steps`."""
    return lambda step: max_prob * jnp.minimum(step.astype(jnp.float32) / max(ramp_steps, 1), 1.0)
