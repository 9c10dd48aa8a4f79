"""Train a flaxformer_lite model: python train.py --config=configs/quickstart.py --workdir=runs/x

Resumes automatically from the newest good checkpoint in --workdir (rerun the same command after a
crash). Writes TensorBoard events, metrics.jsonl, loss.png and checkpoints to the workdir. The loop
itself is `flaxformer_lite.train.loop.train_and_evaluate`.
"""

from absl import app, flags
from ml_collections import config_flags

from flaxformer_lite import cli
from flaxformer_lite.train import loop, runtime


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_console()
    try:
        loop.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
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
