"""Evaluate a trained model: python eval.py --config=configs/quickstart.py --workdir=runs/quickstart

Restores the params of the newest (or --checkpoint_step) checkpoint in --workdir (no optimizer
state), or with --hf_dir=DIR and no checkpoint in --workdir those of an imported transformers model
(Marian opus-mt, with its own tokenizer), and reports on --split: token-level perplexity for
every task; for translation also sacreBLEU and chrF of beam-search output (with the sacrebleu
signatures). Writes <dataset>.<split>.{hyp,src,ref<j>}.txt and <dataset>.<split>.json to --output_dir (default
<workdir>/eval/); an own corpus's <dataset> carries its source hash, so no evaluation overwrites another's.
They are written all or none: a full disk leaves the previous ones whole.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from flaxformer_lite import cli, decoding, ensemble, evaluation, experiment, files, tasks


def evaluate(config, workdir: str, split: str, *, beams: int, alpha: float, max_examples: int,
             batch_size: int, step: int | None = None, output_dir: str = "", hf_dir: str = "",
             length_penalty: str = "gnmt", checkpoint: str = "last",
             weights: str = "auto", members: tuple[str, ...] = (),
             ensemble_mode: str = "log") -> dict:  # fmt: skip
    """Evaluate the trained workdir (or an imported `hf_dir`) on `split`; write the outputs, return them."""
    decoding.check_options(beam_size=beams, alpha=alpha, length_penalty=length_penalty)
    if hf_dir:
        config = config.copy_and_resolve_references()
        config.init_from_hf = hf_dir
    exp = experiment.build(config, workdir, tokenizer="load")
    step, params = exp.restore_params(step, checkpoint=checkpoint, weights=weights)
    if exp.task.classifies:  # accuracy, F1, loss; predictions with probabilities (classify_eval.py)
        from flaxformer_lite import classify_eval

        summary = {"split": split, "checkpoint_step": step, "checkpoint": checkpoint, "weights": weights,
                   "dataset": config.dataset_name}  # fmt: skip
        out_dir = output_dir or os.path.join(workdir, "eval")
        return classify_eval.evaluate_and_write(exp, params, split, out_dir=out_dir, summary=summary,
                                                max_examples=max_examples)  # fmt: skip
    decode = None
    if exp.task.translates:
        decode = _decode_fn(
            exp, params, beams=beams, alpha=alpha, length_penalty=length_penalty, members=members,
            ensemble_mode=ensemble_mode, checkpoint=checkpoint, weights=weights,
        )  # fmt: skip
    max_batches = -(-max_examples // exp.host_batch_size) if max_examples else 0
    result = evaluation.evaluate(
        exp, params, split=split, max_batches=max_batches, bleu_examples=max_examples, decode_fn=decode,
        batch_size=batch_size or config.batch_size,
    )  # fmt: skip
    summary = {"split": split, "checkpoint_step": step, "checkpoint": checkpoint, "weights": weights,
               "dataset": config.dataset_name}  # fmt: skip
    out_dir = output_dir or os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    # Another dataset, checkpoint, weights or ensemble never overwrites these (the newest params: no suffix).
    which = "".join(f".{v}" for v, default in ((checkpoint, "last"), (weights, "auto")) if v != default)
    which += f".ensemble{len(members) + 1}" if members else ""
    prefix = os.path.join(out_dir, f"{exp.data.tag}.{split}{which}")
    outputs = {}
    if exp.task.translates:
        outputs[f"{prefix}.hyp.txt"] = _lines(result.pop("hypotheses"))
        outputs[f"{prefix}.src.txt"] = _lines(result.pop("sources"))
        for j, refs in enumerate(result.pop("references")):
            outputs[f"{prefix}.ref{j}.txt"] = _lines(refs)
        summary.update(beam_size=beams, alpha=alpha, length_penalty=length_penalty)
        if members:  # BLEU/chrF of the ensemble; perplexity is --workdir's model's alone
            summary.update(ensemble=[workdir, *members], ensemble_mode=ensemble_mode)
    if config.get("init_from_hf"):
        summary["init_from_hf"] = config.init_from_hf
    summary.update(result, files=prefix + ".*")
    outputs[f"{prefix}.json"] = json.dumps(summary, indent=1)
    # All or none: a full disk keeps the previous outputs, never an empty or a mismatched set.
    files.write_all(outputs, fix="free space (or pick another --output_dir) and rerun")
    return summary


def _decode_fn(exp, params, *, beams, alpha, length_penalty, members, ensemble_mode, checkpoint, weights):
    """The jitted (params, sources) -> ids decoder: the workdir's model, or an ensemble with `members`."""
    models, all_params = [exp.inference_model], [params]
    if members:
        more = ensemble.load(exp, list(members), checkpoint=checkpoint, weights=weights)
        models, all_params = models + more[0], all_params + more[1]
    decode = tasks.translate_fn(
        models if members else models[0], beam_size=beams, alpha=alpha,
        max_decode_length=exp.config.max_decode_length, length_penalty=length_penalty,
        ensemble_mode=ensemble_mode,
    )  # fmt: skip
    return (lambda _, inputs: decode(all_params, inputs)) if members else decode


def _lines(lines: list[str]) -> str:
    return "".join(line.replace("\n", " ") + "\n" for line in lines)


def _print(summary: dict) -> None:
    if "f1" in summary:  # a classification task
        from flaxformer_lite import classify_eval

        print(classify_eval.describe(summary))
        return
    print(f"{summary['split']} (step {summary['checkpoint_step']}): perplexity {summary['perplexity']:.2f}")
    if "bleu" not in summary:
        return
    print(f"BLEU {summary['bleu']:.2f}  {summary['bleu_signature']}")
    for j, b in enumerate(summary.get("bleu_per_reference", [])):
        print(f"  BLEU against reference {j} alone (ref{j}.txt): {b:.2f}")
    print(f"chrF {summary['chrf']:.2f}  {summary['chrf_signature']}")
    print(
        f"({summary['examples']} sentences, {summary['references_per_sentence']} references each, "
        f"{summary['trimmed_sources']} sources trimmed to max_length, "
        f"{summary['byte_fallback_tokens']} byte-fallback tokens for characters outside the vocabulary)"
    )
    print(f"outputs: {summary['files']}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cli.quiet_console()
    try:
        summary = evaluate(
            f.config, f.workdir, f.split, beams=f.beam_size, alpha=f.alpha, max_examples=f.max_examples,
            batch_size=f.batch_size, step=None if f.checkpoint_step < 0 else f.checkpoint_step,
            output_dir=f.output_dir, hf_dir=f.hf_dir, length_penalty=f.length_penalty,
            checkpoint=f.checkpoint, weights=f.weights, members=tuple(d for d in f.ensemble.split(",") if d),
            ensemble_mode=f.ensemble_mode,
        )  # fmt: skip
    except cli.USER_ERRORS as e:
        cli.exit_with_error(e)
    logging.info("summary: %s", summary)
    _print(summary)


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
        "last | best (best validation score kept) | averaged (flaxformer_lite.average) | STEP.",
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
