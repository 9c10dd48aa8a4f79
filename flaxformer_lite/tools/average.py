"""Average the params of several checkpoints of a run into one checkpoint that eval.py and generate.py read.

    python -m flaxformer_lite.tools.average --config=configs/quickstart.py --workdir=runs/quickstart --last=5
    python -m flaxformer_lite.tools.average --config=configs/quickstart.py --workdir=runs/quickstart --best=5
    python eval.py --config=configs/quickstart.py --workdir=runs/quickstart --checkpoint=averaged

--last=N takes the newest N checkpoints, --best=N the N with the best validation score (a run
trained with --config.valid_metric and --config.keep_best). The mean is taken in float64 and
stored as the params' dtype in <workdir>/averaged/<newest step>/ (params, config with
`averaged_from`, checksums), replacing an earlier average once it is written whole (a full disk
keeps the earlier one). The raw params are averaged, or with --weights=ema the moving averages the
run kept.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from flaxformer_lite import cli, files
from flaxformer_lite.train import checkpoint, experiment, selection, training


def choose_steps(ckpt: checkpoint.Checkpointer, last: int = 0, best: int = 0) -> list[int]:
    """The newest `last` steps, or the `best` steps by validation score (best first)."""
    if bool(last) == bool(best):
        raise ValueError("give one of --last=N or --best=N (N >= 1)")
    steps, n = ckpt.steps(), last or best
    if best:
        metric, mode, scores = ckpt.scores()
        steps = selection.best_steps(scores, mode, n)
        what = f"checkpoints with a validation score ({metric})"
    else:
        steps, what = steps[-n:], "checkpoints"
    if len(steps) < n:
        raise ValueError(
            f"asked to average {n} but {ckpt.directory!r} holds {len(steps)} {what}: average fewer, or keep "
            "more when training (--config.keep_checkpoints, --config.keep_best with --config.valid_metric)"
        )
    return steps


def average(exp, steps: list[int], item: str = "params"):
    """The mean of the `item` weights of `steps` (float64 on the host, cast back), placed as the model's
    params. Every step must have been written by this model: shapes and architecture are checked."""
    abstract = training.abstract_params(exp.model, exp.task, exp.batch_shape, exp.mesh)
    ckpt = exp.checkpointer(save_every=1)
    total, damaged = None, []
    try:
        for step in steps:
            try:
                _, params = ckpt.restore_params(abstract, step=step, item=item)  # shapes, checksums
            except checkpoint.CheckpointMismatchError:
                raise
            except ValueError:  # unreadable (the warning above says why): the others are still read
                damaged.append(step)
                continue
            exp._check_model_matches(ckpt.saved_config(step), step)  # same shapes, other architecture
            host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float64), params)
            total = host if total is None else jax.tree.map(np.add, total, host)
        config = ckpt.saved_config(max(steps)) or {}
    finally:
        ckpt.close()
    if damaged:
        readable = sorted(set(steps) - set(damaged))
        raise ValueError(
            f"checkpoint step{'s' * (len(damaged) > 1)} {sorted(damaged)} in {ckpt.directory!r} "
            f"{'are' if len(damaged) > 1 else 'is'} unreadable (see the warning above); steps {readable} "
            "read fine. Average those: choose fewer steps, or move the damaged one out of the "
            "checkpoints folder (to <step>.corrupt, as train.py does) and rerun"
        )
    mean = jax.tree.map(lambda t, a: (t / len(steps)).astype(a.dtype), total, abstract)
    return jax.tree.map(lambda m, a: jax.device_put(m, a.sharding), mean, abstract), config


def write(exp, steps: list[int], params, config: dict, how: str) -> str:
    """Replace <workdir>/averaged with one checkpoint of `params` at the newest of `steps`.

    The new average is written beside the old one (`averaged.new`) and swapped in by renames once
    complete, so a failed write (a full disk) leaves the previous average as it was."""
    final = exp.averaged_dir
    staging, previous = f"{final}.new", f"{final}.old"
    for leftover in (staging, previous):  # our own, from a run that stopped half way
        shutil.rmtree(leftover, ignore_errors=True)
    ckpt = checkpoint.Checkpointer(staging, save_every=1, async_save=False)
    try:
        try:
            ckpt.save_params(max(steps), params, {**config, "averaged_from": sorted(steps), "average": how})
        finally:
            ckpt.close()
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        kept = "the previous average is kept" if os.path.isdir(final) else "no average was written"
        raise OSError(
            f"writing the average to {final!r} failed ({files.reason(e)}); {kept}. "
            "Free space (or fix the directory) and rerun."
        ) from e
    if os.path.isdir(final):
        os.replace(final, previous)
    os.replace(staging, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def define_flags() -> None:
    """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
    config_flags.DEFINE_config_file("config", None, "The config the model was trained with.")
    flags.DEFINE_string("workdir", None, "The training workdir.")
    flags.DEFINE_integer("last", 0, "Average the newest N checkpoints.", lower_bound=0)
    flags.DEFINE_integer(
        "best", 0, "Average the N checkpoints with the best validation score.", lower_bound=0
    )
    flags.DEFINE_enum("weights", "raw", ["raw", "ema"], "Average the raw params or their moving averages.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    cli.quiet_console()
    try:
        exp = experiment.build(FLAGS.config, FLAGS.workdir, tokenizer="load")
        ckpt = exp.checkpointer(save_every=1)
        try:
            steps, metric = choose_steps(ckpt, FLAGS.last, FLAGS.best), ckpt.scores()[0]
        finally:
            ckpt.close()
        item = "ema" if FLAGS.weights == "ema" else "params"
        params, config = average(exp, steps, item)
        how = f"last {FLAGS.last}" if FLAGS.last else f"best {FLAGS.best} by {metric}"
        where = write(exp, steps, params, config, how)
        logging.info("averaged steps %s into %s", steps, where)
        print(f"averaged the {item} of steps {sorted(steps)} ({how}) into {where} (--checkpoint=averaged)")
    except cli.USER_ERRORS as e:
        cli.exit_with_error(e)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
