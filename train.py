"""Train a flaxformer_lite model: python train.py --config=configs/quickstart.py --workdir=runs/x

Resumes automatically from the newest good checkpoint in --workdir (rerun the same command after a
crash). Writes TensorBoard events, metrics.jsonl, loss.png and checkpoints to the workdir.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from flaxformer_lite import checkpoint, evaluation, experiment, sharding, training
from flaxformer_lite import input_pipeline as ip

MIN_FREE_BYTES = 200 * 2**20
PREPARE_TIMEOUT_S = 3 * 3600  # other processes wait this long for process 0's data preparation


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
        probe = os.path.join(workdir, f".write_probe.{os.getpid()}")  # one per process
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

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            path = os.path.join(workdir, "metrics.jsonl")
            _drop_rows_after(path, resume_step)
            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self.jsonl = open(path, "a")

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


def _drop_rows_after(path: str, step: int) -> None:
    """Forget metrics.jsonl rows past the step a run resumes from (they are about to be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(keep) < len(lines):
        logging.info("metrics.jsonl: %d rows after step %d will be recomputed", len(lines) - len(keep), step)
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


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


def initialize_distributed(config) -> None:
    """jax.distributed for multi-process runs (CPU devices talk through gloo, JAX's default)."""
    if not config.distributed:
        return
    kwargs = {}
    if config.coordinator_address:
        kwargs = dict(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
        if config.coordinator_address.split(":")[0] in ("127.0.0.1", "localhost"):
            kwargs["coordinator_bind_address"] = config.coordinator_address  # JAX binds all interfaces
    jax.distributed.initialize(**kwargs)


def prepare_tokenizer(config, workdir: str):
    """Process 0 prepares the dataset and trains the tokenizer first; the others then load them.

    On a shared filesystem the others find everything ready; with per-host disks each prepares its
    own copy (both are deterministic).
    """
    if jax.process_index() == 0:
        sp = experiment.tokenizer(config, workdir)
    # A barrier of the distributed runtime (not a device collective, which times out in seconds).
    barrier = ocp.multihost.get_barrier_sync_fn()  # a no-op with one process
    barrier(key="flaxformer_lite:tokenizer_ready", timeout_ms=PREPARE_TIMEOUT_S * 1000)
    return sp if jax.process_index() == 0 else experiment.tokenizer(config, workdir)


def check_room_for_checkpoints(state, workdir: str, keep: int) -> None:
    """Fail before training when the disk cannot hold the checkpoints the run will write."""
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    need = MIN_FREE_BYTES + (keep + 1) * size  # a new checkpoint is written before the oldest goes
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise TrainingError(
            f"workdir {workdir!r} has {free / 2**20:.1f} MiB free but {keep + 1} checkpoints of "
            f"{size / 2**20:.1f} MiB need {need / 2**20:.1f} MiB; free space, lower keep_checkpoints, "
            "or pick another --workdir."
        )


def make_train_step(config, model, tx, schedule, shardings, mesh):
    """The jitted train step: state sharded as `shardings` (donated), batch split over data x fsdp."""
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
        return jax.jit(
            step_fn,
            in_shardings=(shardings, sharding.batch_sharding(mesh), None),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )


def evaluate(config, workdir: str, sp, model, params, mesh, with_bleu: bool) -> dict:
    """Validation loss/perplexity, and BLEU/chrF of greedy output for translation if `with_bleu`."""
    eval_model = model.clone(config=model.config.replace(deterministic=True))
    batches = experiment.eval_dataset(config, workdir, sp)
    result = evaluation.evaluate_loss(params, eval_model, config.task, batches, mesh, config.eval_batches)
    if with_bleu and config.task == "translation" and config.bleu_examples > 0:
        bleu = evaluation.evaluate_bleu(
            eval_model,
            params,
            sp,
            experiment.open_split(config, workdir, config.eval_split),
            experiment.feature_keys(config, workdir),
            max_examples=config.bleu_examples,
            max_length=config.max_length,
            max_decode_length=config.max_decode_length,
            batch_size=config.batch_size,  # every process decodes the same global batch of rows
            mesh=mesh,
        )
        result.update({k: bleu[k] for k in ("bleu", "chrf", "bleu_signature", "examples")})
    return result


class MetricsWindow:
    """Step metrics kept on device until a sync; a sync stops the run on a non-finite loss."""

    def __init__(self, step: int):
        self.pending, self.last_time, self.last_step = [], time.time(), step

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))

    def sync(self, step: int, last_good: str) -> dict:
        """Mean metrics since the last sync, with tokens/s and steps/s measured on the host."""
        fetched = [(s, jax.device_get(m)) for s, m in self.pending]
        self.pending.clear()
        for s, m in fetched:
            if not np.isfinite(m["loss"]):
                raise TrainingError(
                    f"loss became {m['loss']} at step {s}; the last good checkpoint ({last_good}) is kept. "
                    "Lower learning_rate, enable clip_norm, or check the data."
                )
        if not fetched:
            return {}
        elapsed = max(time.time() - self.last_time, 1e-9)
        summary = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        summary["tokens_per_sec"] = sum(float(m["tokens"]) for _, m in fetched) / elapsed
        summary["steps_per_sec"] = (step - self.last_step) / elapsed
        self.last_time, self.last_step = time.time(), step
        return summary


def train_and_evaluate(config, workdir: str) -> dict:
    """Train to config.num_train_steps (resuming if possible); returns the final eval metrics."""
    initialize_distributed(config)  # first: any JAX call would fix a single-process backend
    experiment.validate(config)
    prepare_workdir(workdir)
    logging.info("devices: %s; process %d of %d", jax.devices(), jax.process_index(), jax.process_count())

    sp = prepare_tokenizer(config, workdir)
    model = experiment.make_model(config, sp.get_piece_size())
    logging.info("model config: %s", model.config)
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
    tx, schedule = experiment.optimizer(config, model.config.d_model)
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    batch_shape = (config.batch_size, config.max_length)
    state, shardings = training.create_train_state(model, tx, init_rng, config.task, batch_shape, mesh)
    check_room_for_checkpoints(state, workdir, config.keep_checkpoints)
    stats = ip.TokenizeStats()
    train_iter = iter(experiment.train_dataset(config, workdir, sp, stats))

    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=config.checkpoint_every,
        keep=config.keep_checkpoints,
        async_save=config.async_checkpoints,
    )
    start, restored = 0, ckpt.restore(checkpoint.abstract_like(state, shardings), train_iter)
    if restored is not None:
        start, state = restored
        logging.info("resumed from the checkpoint at step %d", start)
    p_train_step = make_train_step(config, model, tx, schedule, shardings, mesh)
    logger = Logger(workdir, resume_step=start)
    config_json = json.loads(config.to_json_best_effort())
    window = MetricsWindow(start)
    bar = tqdm.tqdm(
        total=config.num_train_steps,
        initial=start,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    with jax.set_mesh(mesh), ckpt.finishing_saves():
        for step in range(start + 1, config.num_train_steps + 1):
            batch = sharding.global_batch(next(train_iter), mesh)
            state, metrics = p_train_step(state, batch, dropout_rng)
            window.add(step, metrics)
            bar.update(1)
            is_last = step == config.num_train_steps
            if step % config.log_every == 0 or is_last or step % config.checkpoint_every == 0:
                # Before any save: a non-finite loss stops the run here, so it is never checkpointed.
                summary = window.sync(step, last_good=ckpt.describe_latest())
                if step % config.log_every == 0 or is_last:
                    logger.write(step, "train", summary)
                    bar.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{summary['tokens_per_sec']:.0f}")
            if step % config.checkpoint_every == 0 or is_last:
                ckpt.save(step, state, train_iter, config_json, force=is_last)
            if config.eval_every and step % config.eval_every == 0 and not is_last:
                with_bleu = bool(config.bleu_every) and step % config.bleu_every == 0
                result = evaluate(config, workdir, sp, model, state.params, mesh, with_bleu)
                logger.write(step, "eval", result)
                logging.info("step %d eval: %s", step, _printable(result))
    bar.close()
    ckpt.close()
    logging.info("tokenization: %s", stats.report())
    final = evaluate(config, workdir, sp, model, state.params, mesh, with_bleu=True)
    logger.write(config.num_train_steps, "eval", final)
    logging.info("final eval: %s", _printable(final))
    logger.close()
    if jax.process_index() == 0:
        plot_losses(workdir)
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=1)
    return final


def _printable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "bleu_signature"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (TrainingError, *experiment.USER_ERRORS) as e:
        experiment.exit_with_error(e)


def define_flags() -> None:
    """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the tokenizer.")
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=experiment.parse_flags)
