"""Evaluate a trained model: python eval.py --config=configs/quickstart.py --workdir=runs/quickstart

Restores the params of the newest (or --checkpoint_step) checkpoint in --workdir (no optimizer
state), or with --hf_dir=DIR and no checkpoint in --workdir those of an imported transformers model
(Marian opus-mt, with its own tokenizer), and reports on --split: token-level perplexity for
every task; for translation also sacreBLEU and chrF of beam-search output (with the sacrebleu
signatures); for a language model with --config.long_document_strides (configs/long_doc.py) also
strided sliding-window perplexity over whole documents (evaluation/long_documents.py), and with
--config.long_document_memory (configs/long_doc_memory.py) perplexity read with Transformer-XL memory.
Writes <dataset>.<split>.{hyp,src,ref<j>}.txt and <dataset>.<split>.json to --output_dir (default
<workdir>/eval/); an own corpus's <dataset> carries its source hash, so no evaluation overwrites another's.
They are written all or none: a full disk leaves the previous ones whole.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from flaxformer_lite import cli
from flaxformer_lite.evaluation import run


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cli.quiet_console()
    try:
        summary = run.evaluate_workdir(
            f.config, f.workdir, f.split, beams=f.beam_size, alpha=f.alpha, max_examples=f.max_examples,
            batch_size=f.batch_size, step=None if f.checkpoint_step < 0 else f.checkpoint_step,
            output_dir=f.output_dir, hf_dir=f.hf_dir, length_penalty=f.length_penalty,
            checkpoint=f.checkpoint, weights=f.weights, members=tuple(d for d in f.ensemble.split(",") if d),
            ensemble_mode=f.ensemble_mode,
        )  # fmt: skip
    except cli.USER_ERRORS as e:
        cli.exit_with_error(e)
    logging.info("summary: %s", summary)
    run.print_summary(summary)


def define_flags() -> None:
    """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
    config_flags.DEFINE_config_file("config", None, "The config the model was trained with.")
    flags.DEFINE_string("workdir", None, "The training workdir (checkpoints, spm.model).")
    flags.DEFINE_string("split", "test", "Split to evaluate.")
    flags.DEFINE_integer("beam_size", 4, "Beam size for translation (1 = greedy).")
    flags.DEFINE_float("alpha", 0.6, "Length-penalty exponent.")
    flags.DEFINE_enum(
        "length_penalty", "gnmt", ["gnmt", "hf"], "gnmt: ((5+n)/6)**alpha; hf: n**alpha (transformers)."
    )
    flags.DEFINE_string(
        "hf_dir", "", "Evaluate this transformers checkpoint dir (e.g. Marian opus-mt) instead."
    )
    flags.DEFINE_integer("max_examples", 0, "Translate at most this many examples (0 = all).", lower_bound=0)
    flags.DEFINE_integer(
        "batch_size", 0, "Sentences per decoding batch (0 = the config's batch_size).", lower_bound=0
    )
    flags.DEFINE_integer("checkpoint_step", -1, "Checkpoint step to evaluate (-1 = newest).", lower_bound=-1)
    flags.DEFINE_string(
        "checkpoint",
        "last",
        "last | best (best validation score kept) | averaged (flaxformer_lite.tools.average) | STEP.",
    )
    flags.DEFINE_enum(
        "weights", "auto", ["auto", "ema", "raw"], "ema: the params' moving average (auto: if kept)."
    )
    flags.DEFINE_string(
        "ensemble", "", "More trained workdirs (comma-separated) decoded with --workdir's model."
    )
    flags.DEFINE_enum("ensemble_mode", "log", ["log", "prob"], "Average log-probs (log) or probs (prob).")
    flags.DEFINE_string("output_dir", "", "Where to write outputs ('' = <workdir>/eval).")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
