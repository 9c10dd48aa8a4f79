"""Training with Transformer-XL memory: the loss of a contiguous-stream batch (data/streams.py)
read with the memory the train state carries (`TrainState.memory`), and the run settings it needs.

The train step passes the memory in as `batch["memory"]` and keeps the memory this loss returns
in its extras as "memory": row i of the next batch continues row i of this one, and so does its
memory. It is part of the checkpointed state, so a resumed run reads on exactly where it stopped.
"""

from __future__ import annotations

import jax.numpy as jnp

from flaxformer_lite import ops
from flaxformer_lite.cli import need
from flaxformer_lite.model.memory import MEMORY


def memory_length(config) -> int:
    """The run's ModelConfig.memory_length (0: no memory), from `--config.model.overrides`."""
    return int(config.model.overrides.get("memory_length") or 0)  # None: the preset's (0)


def loss_sums(params, batch, rng, *, model, task, label_smoothing=0.0, sampling_prob=None):
    """`training.loss_sums` for a stream batch read with `batch["memory"]`; the memory after it
    is the extras' "memory" (not a metric: `train_step` takes it out)."""
    del task, sampling_prob
    logits, new = model.apply(
        {"params": params, MEMORY: batch[MEMORY]},
        batch["decoder_inputs"],
        segment_ids=batch["targets_segment_ids"],
        positions=batch["targets_positions"],
        rngs={"dropout": rng},
        mutable=[MEMORY],
    )
    weights = (batch["targets_segment_ids"] > 0).astype(jnp.float32)
    loss, nll, correct, denom = ops.token_losses(logits, batch["targets"], weights, label_smoothing)
    return loss, (denom, nll, correct, {MEMORY: new[MEMORY]})


def check_config(config, task) -> None:
    """Memory trains a decoder-only LM on streams from the token cache, one micro-batch per step."""
    m = memory_length(config)
    if not m:
        return
    need(task.name == "lm", f"model.overrides.memory_length={m} is for task='lm', not {task.name!r}")
    need(config.grad_accum_steps == 1, "memory_length needs grad_accum_steps=1 (rows carry memory)")
    need(config.objective == "mle", f"memory_length trains objective='mle', not {config.objective!r}")
    need(config.token_cache, "memory_length reads documents from the token cache: set token_cache=True")
    need(config.mesh_context == 1, "memory_length has no context parallelism: set mesh_context=1")
