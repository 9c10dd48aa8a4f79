"""Train a flaxformer_lite model: python train.py --config=configs/quickstart.py --workdir=runs/x

Resumes automatically from the newest good checkpoint in --workdir (rerun the same command after a
crash). Writes TensorBoard events, metrics.jsonl, loss.png and checkpoints to the workdir.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from flaxformer_lite import checkpoint, evaluation, experiment, sharding, training
from flaxformer_lite import input_pipeline as ip

MIN_FREE_BYTES = 200 * 2**20


class _QuietLibraries:
    """absl log filter: INFO chatter of orbax, TFDS and grain hidden; their warnings still shown."""

    NOISY = ("orbax", "tensorflow_datasets", "grain", "etils")

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(f"/{n}/" in record.pathname for n in self.NOISY)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, unusable workdir); the message says why and what to do."""


def prepare_workdir(workdir: str) -> None:
    """Create the workdir and prove it is writable with room to spare, before any real work."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainingError(
            f"workdir {workdir!r} is not writable ({e.strerror}); pick another --workdir."
        ) from e
    free = shutil.disk_usage(workdir).free
    if free < MIN_FREE_BYTES:
        raise TrainingError(
            f"workdir {workdir!r} has only {free / 2**20:.0f} MiB free; free space or pick another --workdir."
        )


class Logger:
    """metrics.jsonl (append) and TensorBoard events, written by process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, prefix: str, values: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in values.items() if np.ndim(v) == 0 and not isinstance(v, str)}
        for k, v in scalars.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def plot_losses(workdir: str) -> None:
    """loss.png from metrics.jsonl: train and eval NLL per token against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, key in (("train", "nll"), ("eval", "nll")):  # same quantity: unsmoothed NLL
        pts = sorted((r["step"], r[key]) for r in rows if r["split"] == split and key in r)
        if pts:
            ax.plot(*zip(*pts, strict=True), label=f"{split} {key}", marker="." if split == "eval" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title(os.path.basename(os.path.abspath(workdir)))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "loss.png"), dpi=100)
    plt.close(fig)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train to config.num_train_steps (resuming if possible); returns the final eval metrics."""
    experiment.validate(config)
    prepare_workdir(workdir)
    if config.distributed:
        kwargs = {}
        if config.coordinator_address:
            kwargs = dict(
                coordinator_address=config.coordinator_address,
                num_processes=config.num_processes,
                process_id=config.process_id,
            )
        jax.distributed.initialize(**kwargs)
    logging.info("devices: %s; process %d of %d", jax.devices(), jax.process_index(), jax.process_count())

    sp = experiment.tokenizer(config, workdir)
    model = experiment.make_model(config, sp.get_piece_size())
    logging.info("model config: %s", model.config)
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
    tx, schedule = experiment.optimizer(config, model.config.d_model)
    rng = jax.random.key(config.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    state, shardings = training.create_train_state(
        model, tx, init_rng, config.task, (config.batch_size, config.max_length), mesh
    )
    stats = ip.TokenizeStats()
    train_iter = iter(experiment.train_dataset(config, workdir, sp, stats))

    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=config.checkpoint_every,
        keep=config.keep_checkpoints,
        async_save=config.async_checkpoints,
    )
    restored = ckpt.restore(checkpoint.abstract_like(state, shardings), train_iter)
    start = 0
    if restored is not None:
        start, state = restored
        logging.info("resumed from the checkpoint at step %d", start)

    sampling = None
    if config.scheduled_sampling_max_prob > 0:
        sampling = training.linear_ramp(
            config.scheduled_sampling_max_prob, config.scheduled_sampling_ramp_steps
        )
    step_fn = functools.partial(
        training.train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        task=config.task,
        label_smoothing=config.label_smoothing,
        grad_accum_steps=config.grad_accum_steps,
        sampling_schedule=sampling,
    )
    with jax.set_mesh(mesh):
        p_train_step = jax.jit(
            step_fn,
            in_shardings=(shardings, sharding.batch_sharding(mesh), None),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )

    logger = Logger(workdir)
    config_json = json.loads(config.to_json_best_effort())
    final = {}

    def evaluate(step: int, with_bleu: bool) -> dict:
        eval_model = model.clone(config=model.config.replace(deterministic=True))
        result = evaluation.evaluate_loss(
            state.params,
            eval_model,
            config.task,
            experiment.eval_dataset(config, workdir, sp),
            mesh,
            config.eval_batches,
        )
        if with_bleu and config.task == "translation":
            bleu = evaluation.evaluate_bleu(
                eval_model,
                state.params,
                sp,
                experiment.open_split(config, workdir, config.eval_split),
                experiment.feature_keys(config, workdir),
                max_examples=config.bleu_examples,
                max_length=config.max_length,
                max_decode_length=config.max_decode_length,
                batch_size=experiment.host_batch_size(config),
                mesh=mesh,
            )
            result.update({k: bleu[k] for k in ("bleu", "chrf", "bleu_signature", "examples")})
        logger.write(step, "eval", result)
        logging.info("step %d eval: %s", step, {k: v for k, v in result.items() if k != "bleu_signature"})
        return result

    pending = []  # (step, device metrics) since the last host sync
    last = time.time()
    last_step = start

    def sync(step: int) -> dict:
        """Fetch pending metrics; stop on a non-finite loss before anything is saved."""
        nonlocal last, last_step
        fetched = [(s, jax.device_get(m)) for s, m in pending]
        pending.clear()
        for s, m in fetched:
            if not np.isfinite(m["loss"]):
                ckpt.wait()
                raise TrainingError(
                    f"loss became {m['loss']} at step {s}; the last good checkpoint "
                    f"(step {max(ckpt.steps(), default='none')}) is kept in {ckpt.directory}. "
                    "Lower learning_rate, enable clip_norm, or check the data."
                )
        if not fetched:
            return {}
        now = time.time()
        summary = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        summary["tokens_per_sec"] = sum(float(m["tokens"]) for _, m in fetched) / max(now - last, 1e-9)
        summary["steps_per_sec"] = (step - last_step) / max(now - last, 1e-9)
        last, last_step = now, step
        return summary

    from tqdm import tqdm

    bar = tqdm(
        total=config.num_train_steps,
        initial=start,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    with jax.set_mesh(mesh):
        for step in range(start + 1, config.num_train_steps + 1):
            batch = sharding.global_batch(next(train_iter), mesh)
            state, metrics = p_train_step(state, batch, dropout_rng)
            pending.append((step, metrics))
            bar.update(1)
            is_last = step == config.num_train_steps
            if step % config.log_every == 0 or is_last or step % config.checkpoint_every == 0:
                summary = sync(step)
                if step % config.log_every == 0 or is_last:
                    logger.write(step, "train", summary)
                    bar.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{summary['tokens_per_sec']:.0f}")
            ckpt.save(step, state, train_iter, config_json, force=is_last)
            if config.eval_every and step % config.eval_every == 0 and not is_last:
                evaluate(step, with_bleu=bool(config.bleu_every) and step % config.bleu_every == 0)
    bar.close()
    ckpt.wait()
    logging.info("tokenization: %s", stats.report())
    final = evaluate(config.num_train_steps, with_bleu=True)
    ckpt.close()
    logger.close()
    if jax.process_index() == 0:
        plot_losses(workdir)
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=1)
    return final


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (TrainingError, ValueError, FileNotFoundError, checkpoint.CheckpointMismatchError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def define_flags() -> None:
    """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the tokenizer.")
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=experiment.parse_flags)
