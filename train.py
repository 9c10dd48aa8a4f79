"""Train a flaxformer_lite model: python train.py --config=configs/quickstart.py --workdir=runs/x

Resumes automatically from the newest good checkpoint in --workdir (rerun the same command after a
crash). Writes TensorBoard events, metrics.jsonl, loss.png and checkpoints to the workdir.
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
from absl import app, flags, logging
from ml_collections import config_flags

from flaxformer_lite import (
    checkpoint,
    cli,
    evaluation,
    experiment,
    init_from,
    prefetch,
    reporting,
    runtime,
    sharding,
    tasks,
    validation,
)
from flaxformer_lite import input_pipeline as ip


def evaluate(exp, params, with_bleu: bool) -> dict:
    """Validation loss/perplexity, and BLEU/chrF of decoded output for translation if `with_bleu`
    (greedy, or beam search of valid_beam_size), on bleu_examples sentences (0: all)."""
    c = exp.config
    bleu = None
    if with_bleu and exp.task.translates:
        bleu = c.bleu_examples if c.bleu_examples > 0 else (0 if c.valid_metric in ("bleu", "chrf") else None)
    decode = {}
    if c.get("valid_beam_size", 1) > 1:
        decode["decode_fn"] = _beam_decoder(exp.inference_model, c.valid_beam_size, c.max_decode_length)
    result = evaluation.evaluate(exp, params, max_batches=c.eval_batches, bleu_examples=bleu, **decode)
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
    loop evaluated it with decoding, else None)."""
    config, workdir = exp.config, exp.workdir
    state, shardings = exp.init_state(jax.random.key(config.seed))
    runtime.check_room_for_checkpoints(state, workdir, config.keep_checkpoints + config.get("keep_best", 0))
    stats = ip.TokenizeStats()
    feed = prefetch.DevicePrefetch(
        iter(exp.train_dataset(stats)), put=lambda batch: sharding.global_batch(batch, exp.mesh)
    )
    ckpt = exp.checkpointer()
    exp, start, state = _resume(exp, ckpt, state, shardings, feed)
    config = exp.config
    train_step = exp.train_step(shardings)
    dropout_rng = jax.random.split(jax.random.key(config.seed))[1]
    logger = reporting.Logger(workdir, resume_step=start)
    config_json = json.loads(config.to_json_best_effort())
    window = reporting.MetricsWindow(start, carried=reporting.load_window(workdir, start))
    early = validation.EarlyStopping.from_log(workdir, config, start)  # the scores up to `start`
    if early.stopped:  # the run stopped early before: resuming it is a no-op, as for a finished run
        logging.info("%s", early.reason)
        ckpt.close()
        logger.close()
        feed.close()
        return state, None
    if stats.examples:  # a token cache counted the whole split up front
        logging.info("train split (token cache): %s", stats.report())
    bar = tqdm.tqdm(
        total=config.num_train_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
        disable=jax.process_index() != 0,
    )  # fmt: skip
    stopped, final, in_flight = None, None, collections.deque()
    with jax.set_mesh(exp.mesh), ckpt.finishing_saves(), contextlib.closing(bar), stop.training_loop():
        for step in range(start + 1, config.num_train_steps + 1):
            state, metrics = train_step(state, next(feed), dropout_rng)
            window.add(step, metrics)
            in_flight.append(metrics["loss"])
            if len(in_flight) > MAX_IN_FLIGHT:  # wait for an older step: the bar shows completed steps
                in_flight.popleft().block_until_ready()
                bar.update(1)
            is_last, stopped = step == config.num_train_steps, stop.requested(step, ckpt.manager)
            log = step % config.log_every == 0 or is_last
            scored = validation.evaluates_at(config, step, is_last)  # when stopping too: before the save
            if log:  # a non-finite loss stops the run here (and in `peek`), so it is never checkpointed
                summary = window.sync(step, last_good=ckpt.set_aside_unhealthy, data_wait_s=feed.take_wait())
                logger.write(step, "train", summary)
                bar.update(len(in_flight))
                in_flight.clear()  # the sync waited for every step
                bar.set_postfix(
                    loss=f"{summary['loss']:.3f}", tok_s=f"{summary['tokens_per_sec']:.0f}",
                    data_wait=f"{summary['data_wait']:.0%}",
                )  # fmt: skip
            scores = None
            if scored:
                decode = validation.decodes_at(config, step) or is_last
                scores, result = _validate(exp, state, step, early, logger, decode)
                final = result if is_last else None  # the final evaluation: not done twice
            stopping = scores is not None and early.stopped  # saved, so that a rerun is a no-op
            save = step % config.checkpoint_every == 0 or is_last or stopped or stopping
            save = save or (scores is not None and early.keeps_best)  # the checkpoint carries the score
            if save and not log:  # between rows: the steps since the last row go on into the next one
                summary = window.peek(last_good=ckpt.set_aside_unhealthy)
                window.save(workdir, step)  # a run resumed from this step logs the same rows
            if save:
                loss, force = summary["loss"], is_last or bool(stopped) or scores is not None
                ckpt.save(
                    step, state, feed, config_json, force=force, loss=loss, healthy=window.healthy,
                    scores=scores,
                )  # fmt: skip
            if stopped:
                break
            if stopping:
                logging.warning("%s", early.reason)
                bar.write(early.reason)
                break
        bar.update(len(in_flight))
    bar.close()
    ckpt.close()
    logger.close()
    feed.close()
    logging.info("tokenization: %s", stats.report())
    if stopped:
        message = f"saved step {step} after {stopped}; rerun the same command to resume"
        raise runtime.Stopped(message, 128 + getattr(signal, stopped))
    return state, final


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
    source = exp.config.init_from_hf or exp.config.get("init_from")  # a transformers dir or a workdir of ours
    if source:  # fine-tuning: the imported weights replace the random init (a new head stays new)
        imported = exp.imported_params(shardings.params, state.params)
        ema = None if state.ema_params is None else jax.tree.map(jnp.copy, imported)
        state = state.replace(params=imported, ema_params=ema)
        what = "the transformers checkpoint" if exp.config.init_from_hf else "the pretrained run"
        logging.info("initialised from %s %s", what, source)
    return exp, 0, state


def _validate(exp, state, step: int, early: validation.EarlyStopping, logger, decode: bool):
    """Score the validation split after `step` (BLEU/chrF too if `decode`), log it: (the scores its
    checkpoint carries, the whole result)."""
    result = evaluate(exp, _eval_weights(state), decode)
    logger.write(step, "eval", result)
    logging.info("step %d eval: %s", step, _printable(result))
    return early.add(step, result), result


def _printable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "bleu_signature"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_console()
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except runtime.Stopped as e:
        cli.exit_with_error(e, status=e.exit_code, prefix="")
    except (runtime.TrainingError, *cli.USER_ERRORS) as e:
        cli.exit_with_error(e)


def define_flags() -> None:
    """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the tokenizer.")
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
