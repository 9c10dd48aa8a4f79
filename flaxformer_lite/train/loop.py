"""The training loop: `train_and_evaluate(config, workdir)` is what `train.py` runs.

Resumes from the newest good checkpoint in the workdir (a rerun after a crash goes on where it
stopped, bitwise), writes TensorBoard events, metrics.jsonl, loss.png and checkpoints there, and
ends with an evaluation of the validation split.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
import tqdm
from absl import logging

from flaxformer_lite import sharding, tasks
from flaxformer_lite.data import pipeline as ip
from flaxformer_lite.data import prefetch
from flaxformer_lite.evaluation import split_metrics
from flaxformer_lite.train import checkpoint, experiment, init_from, reporting, runtime, selection


def evaluate(exp, params, with_bleu: bool) -> dict:
    """Validation loss/perplexity, and BLEU/chrF of decoded output for translation if `with_bleu`
    (greedy, or beam search of valid_beam_size), on bleu_examples sentences (0: all)."""
    c = exp.config
    bleu = None
    if with_bleu and exp.task.translates:
        bleu = c.bleu_examples if c.bleu_examples > 0 else (0 if c.valid_metric in ("bleu", "chrf") else None)
    decode = {}
    if c.valid_beam_size > 1:
        decode["decode_fn"] = _beam_decoder(exp.inference_model, c.valid_beam_size, c.max_decode_length)
    result = split_metrics.evaluate(exp, params, max_batches=c.eval_batches, bleu_examples=bleu, **decode)
    return {k: v for k, v in result.items() if k not in ("hypotheses", "sources", "references")}


@functools.lru_cache(maxsize=4)
def _beam_decoder(model, beam_size: int, max_decode_length: int):
    """Validation's jitted beam search, built once per model (Linen modules hash by value): a new
    translate_fn at each validation was a new jit, traced and compiled again every time."""
    return tasks.translate_fn(model, beam_size=beam_size, alpha=0.6, max_decode_length=max_decode_length)


def _eval_weights(state):
    """The weights validation scores: the moving average when the run keeps one (as eval.py reads)."""
    return state.params if state.ema_params is None else state.ema_params


def train_and_evaluate(config, workdir: str) -> dict:
    """Train to config.num_train_steps (resuming if possible); returns the final eval metrics."""
    runtime.initialize_distributed(config)  # first: any JAX call would fix a single-process backend
    experiment.validate(config)
    runtime.prepare_workdir(workdir)
    reporting.log_to_file(os.path.join(workdir, f"train.{jax.process_index()}.log"))
    lock = runtime.WorkdirLock(workdir)
    stop = runtime.StopRequests()
    try:
        logging.info("devices: %s; process %d of %d", jax.devices(), jax.process_index(), jax.process_count())
        _refuse_other_data(config, workdir)  # before build, which prepares the data
        exp = experiment.build(config, workdir)
        logging.info("model config: %s", exp.model.config)
        state, final = train(exp, stop)
        final_step = int(jax.device_get(state.step))  # num_train_steps, or where it stopped early
        if final is None:  # not scored at the last step already (valid_metric scores it in the loop)
            final = evaluate(exp, _eval_weights(state), with_bleu=True)
            logger = reporting.Logger(workdir, resume_step=final_step)
            logger.write(final_step, "eval", final)
            logger.close()
    finally:
        stop.close()
        lock.release()
    logging.info("final eval: %s", _printable(final))
    if jax.process_index() == 0:
        reporting.plot_losses(workdir)
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=1)
    return final


MAX_IN_FLIGHT = 2  # steps dispatched ahead of the last completed one (the bar counts completed steps)


def train(exp, stop: runtime.StopRequests):
    """The training loop, from the newest checkpoint: (final state, the scores of the last step if the
    loop evaluated it with decoding, else None).

    Each step: dispatch it (`_Run.step`), then the concerns at their intervals, each one method:
    a metrics row every log_every steps, validation at eval_every, a checkpoint at checkpoint_every
    (and whenever a stop, a score or the last step needs one), then stop on a signal or early stopping.
    """
    run = _Run(exp, stop)
    if run.early.stopped:  # the run stopped early before: resuming it is a no-op, as for a finished run
        logging.info("%s", run.early.reason)
        run.close()
        return run.state, None
    config, stopped, final = run.exp.config, None, None
    with (
        jax.set_mesh(exp.mesh),
        run.ckpt.finishing_saves(),
        contextlib.closing(run.bar),
        stop.training_loop(),
    ):
        for step in range(run.start + 1, config.num_train_steps + 1):
            run.step(step)
            is_last, stopped = step == config.num_train_steps, stop.requested(step, run.ckpt.manager)
            logged = step % config.log_every == 0 or is_last
            if logged:
                run.log(step)
            scores = None
            if selection.evaluates_at(config, step, is_last):  # when stopping too: before the save
                scores, result = run.validate(step, decode=selection.decodes_at(config, step) or is_last)
                final = result if is_last else None  # the final evaluation: not done twice
            stopping = scores is not None and run.early.stopped  # saved, so that a rerun is a no-op
            save = step % config.checkpoint_every == 0 or is_last or stopped or stopping
            if save or (scores is not None and run.early.keeps_best):  # the checkpoint carries the score
                run.save(step, logged, scores, force=is_last or bool(stopped) or scores is not None)
            if stopped:
                break
            if stopping:
                logging.warning("%s", run.early.reason)
                run.bar.write(run.early.reason)
                break
        run.finish_bar()
    run.close()
    if stopped:
        message = f"saved step {step} after {stopped}; rerun the same command to resume"
        raise runtime.Stopped(message, 128 + getattr(signal, stopped))
    return run.state, final


class _Run:
    """One run's loop state (train state, data feed, checkpoints, metrics window, logger, bar) and the
    pieces `train` calls at their intervals."""

    def __init__(self, exp, stop: runtime.StopRequests):
        config, workdir = exp.config, exp.workdir
        state, shardings = exp.init_state(jax.random.key(config.seed))
        keep = config.keep_checkpoints + config.keep_best
        runtime.check_room_for_checkpoints(state, workdir, keep)
        self.stats = ip.TokenizeStats()
        self.feed = prefetch.DevicePrefetch(
            iter(exp.train_dataset(self.stats)), put=lambda batch: sharding.global_batch(batch, exp.mesh)
        )
        self.ckpt = exp.checkpointer()
        self.exp, self.start, self.state = _resume(exp, self.ckpt, state, shardings, self.feed)
        config = self.exp.config
        self.train_step = self.exp.train_step(shardings)
        self.dropout_rng = jax.random.split(jax.random.key(config.seed))[1]
        self.logger = reporting.Logger(workdir, resume_step=self.start)
        self.config_json = json.loads(config.to_json_best_effort())
        self.window = reporting.MetricsWindow(self.start, carried=reporting.load_window(workdir, self.start))
        self.early = selection.EarlyStopping.from_log(workdir, config, self.start)  # scores up to `start`
        if self.stats.examples:  # a token cache counted the whole split up front
            logging.info("train split (token cache): %s", self.stats.report())
        self.bar = tqdm.tqdm(
            total=config.num_train_steps, initial=self.start, desc="train", unit="step", dynamic_ncols=True,
            disable=jax.process_index() != 0,
        )  # fmt: skip
        self.in_flight = collections.deque()
        self.summary = {}

    def step(self, step: int) -> None:
        """Dispatch one step; wait for the one MAX_IN_FLIGHT before it (the bar counts completed steps)."""
        self.state, metrics = self.train_step(self.state, next(self.feed), self.dropout_rng)
        self.window.add(step, metrics)
        self.in_flight.append(metrics["loss"])
        if len(self.in_flight) > MAX_IN_FLIGHT:
            self.in_flight.popleft().block_until_ready()
            self.bar.update(1)

    def log(self, step: int) -> None:
        """A metrics row (metrics.jsonl, TensorBoard, the bar); a non-finite loss stops the run here
        (and in `save`'s peek), so it is never checkpointed."""
        self.summary = self.window.sync(
            step, last_good=self.ckpt.set_aside_unhealthy, data_wait_s=self.feed.take_wait()
        )
        self.logger.write(step, "train", self.summary)
        self.finish_bar()  # the sync waited for every step
        self.bar.set_postfix(
            loss=f"{self.summary['loss']:.3f}", tok_s=f"{self.summary['tokens_per_sec']:.0f}",
            data_wait=f"{self.summary['data_wait']:.0%}",
        )  # fmt: skip

    def validate(self, step: int, decode: bool):
        """Score the validation split after `step` (BLEU/chrF too if `decode`), log it: (the scores its
        checkpoint carries, the whole result)."""
        result = evaluate(self.exp, _eval_weights(self.state), decode)
        self.logger.write(step, "eval", result)
        logging.info("step %d eval: %s", step, _printable(result))
        return self.early.add(step, result), result

    def save(self, step: int, logged: bool, scores, force: bool) -> None:
        if not logged:  # between rows: the steps since the last row go on into the next one
            self.summary = self.window.peek(last_good=self.ckpt.set_aside_unhealthy)
            self.window.save(self.exp.workdir, step)  # a run resumed from this step logs the same rows
        self.ckpt.save(
            step, self.state, self.feed, self.config_json, force=force, loss=self.summary["loss"],
            healthy=self.window.healthy, scores=scores,
        )  # fmt: skip

    def finish_bar(self) -> None:
        self.bar.update(len(self.in_flight))
        self.in_flight.clear()

    def close(self) -> None:
        self.bar.close()
        self.ckpt.close()
        self.logger.close()
        self.feed.close()
        if self.stats.examples:  # memory's document streams read the token cache without counting
            logging.info("tokenization: %s", self.stats.report())


def _refuse_other_data(config, workdir: str) -> None:
    """A rerun of a workdir with another dataset (or tokenizer) is refused before anything is prepared."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
    if steps:  # the newest step's config (None if unreadable: build's full check still comes)
        experiment.refuse_other_data(init_from.saved_config(workdir), config, workdir, steps[-1])


def _resume(exp, ckpt, state, shardings, train_iter):
    """(experiment, start step, state): from the newest readable checkpoint, or the imported weights.

    Before restoring, a resumed run that would compute something else is refused (its optimizer
    state may not even have the same tree) and the schedule's horizon is fixed (`for_resume`).
    """
    newest = ckpt.steps()[-1] if ckpt.steps() else None
    exp = exp.for_resume(None if newest is None else ckpt.saved_config(newest), newest or 0)
    restored = ckpt.restore(checkpoint.abstract_like(state, shardings), train_iter)
    if restored is not None:
        logging.info("resumed from the checkpoint at step %d", restored[0])
        return exp, *restored
    source = exp.config.init_from_hf or exp.config.init_from  # a transformers dir or a workdir of ours
    if source:  # fine-tuning: the imported weights replace the random init (a new head stays new)
        imported = exp.imported_params(shardings.params, state.params)
        ema = None if state.ema_params is None else jax.tree.map(jnp.copy, imported)
        state = state.replace(params=imported, ema_params=ema)
        what = "the transformers checkpoint" if exp.config.init_from_hf else "the pretrained run"
        logging.info("initialised from %s %s", what, source)
    return exp, 0, state


def _printable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "bleu_signature"}
