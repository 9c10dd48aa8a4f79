"""Evaluate a trained model: python eval.py --config=configs/quickstart.py --workdir=runs/quickstart

Restores the newest (or --checkpoint_step) checkpoint in --workdir and reports on --split:
token-level perplexity for every model family; for translation also sacreBLEU and chrF of
beam-search output (with the sacrebleu signatures). Writes <split>.hyp.txt, <split>.src.txt,
<split>.ref<j>.txt and eval_<split>.json to <workdir>/eval/.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from flaxformer_lite import checkpoint, decoding, evaluation, experiment, sharding, training


def restore_params(config, workdir: str, model, mesh, step: int | None = None):
    """(step, params) of the newest readable checkpoint, or a clear error if there is none."""
    tx, _ = experiment.optimizer(config, model.config.d_model)
    abstract, _ = training.state_shardings(
        model, tx, config.task, (config.batch_size, config.max_length), mesh
    )
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"no checkpoints in {ckpt_dir!r}; train first: python train.py --config=... --workdir={workdir}"
        )
    ckpt = checkpoint.Checkpointer(ckpt_dir, save_every=1)
    restored = ckpt.restore(abstract, step=step)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{ckpt_dir!r} holds no checkpoint; train first with train.py.")
    return restored[0], restored[1].params


def load(config, workdir: str, step: int | None = None):
    """(sp, model, mesh, step, params) for a trained workdir; never trains a tokenizer."""
    if not os.path.isfile(os.path.join(workdir, "spm.model")):
        raise FileNotFoundError(f"no spm.model in {workdir!r}: is it the workdir of a train.py run?")
    sp = experiment.tokenizer(config, workdir)
    model = experiment.make_model(config, sp.get_piece_size())
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
    step, params = restore_params(config, workdir, model, mesh, step)
    return sp, model.clone(config=model.config.replace(deterministic=True)), mesh, step, params


def beam_decode_fn(model, beams: int, alpha: float, max_decode_length: int):
    """Jitted [B, S] -> [B, max_len] beam search; the output may be up to 1.5x the source + 10 tokens."""

    def decode(params, inputs):
        src_len = jnp.sum(inputs != 0, axis=1)
        limit = jnp.minimum((src_len * 3) // 2 + 10, max_decode_length)
        if beams == 1:
            return decoding.translate(model, params, inputs, max_decode_length)
        return decoding.translate_beam(
            model, params, inputs, max_decode_length, beams=beams, alpha=alpha, max_lengths=limit
        )

    return jax.jit(decode)


def evaluate(
    config,
    workdir: str,
    split: str,
    *,
    beams: int,
    alpha: float,
    max_examples: int,
    batch_size: int,
    step: int | None = None,
):
    experiment.validate(config)
    sp, model, mesh, step, params = load(config, workdir, step)
    batch_size = batch_size or config.batch_size
    summary = {"split": split, "checkpoint_step": step, "dataset": config.dataset_name}
    batches = experiment.eval_dataset(config, workdir, sp, split)
    max_batches = -(-max_examples // experiment.host_batch_size(config)) if max_examples else 0
    summary.update(evaluation.evaluate_loss(params, model, config.task, batches, mesh, max_batches))
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    if config.task == "translation":
        result = evaluation.evaluate_bleu(
            model,
            params,
            sp,
            experiment.open_split(config, workdir, split),
            experiment.feature_keys(config, workdir),
            max_examples=max_examples,
            max_length=config.max_length,
            max_decode_length=config.max_decode_length,
            batch_size=batch_size,
            mesh=mesh,
            decode_fn=beam_decode_fn(model, beams, alpha, config.max_decode_length),
        )
        write = functools.partial(_write_lines, out_dir)
        write(f"{split}.hyp.txt", result.pop("hypotheses"))
        write(f"{split}.src.txt", result.pop("sources"))
        for j, refs in enumerate(result.pop("references")):
            write(f"{split}.ref{j}.txt", refs)
        summary.update(result, beam_size=beams, alpha=alpha)
    with open(os.path.join(out_dir, f"eval_{split}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _write_lines(out_dir: str, name: str, lines: list[str]) -> None:
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        f.writelines(line.replace("\n", " ") + "\n" for line in lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        summary = evaluate(
            flags.FLAGS.config,
            flags.FLAGS.workdir,
            flags.FLAGS.split,
            beams=flags.FLAGS.beam_size,
            alpha=flags.FLAGS.alpha,
            max_examples=flags.FLAGS.max_examples,
            batch_size=flags.FLAGS.batch_size,
            step=None if flags.FLAGS.checkpoint_step < 0 else flags.FLAGS.checkpoint_step,
        )
    except experiment.USER_ERRORS as e:
        experiment.exit_with_error(e)
    logging.info("summary: %s", summary)
    print(f"{summary['split']} (step {summary['checkpoint_step']}): perplexity {summary['perplexity']:.2f}")
    if "bleu" in summary:
        print(f"BLEU {summary['bleu']:.2f}  {summary['bleu_signature']}")
        for j, b in enumerate(summary.get("bleu_per_reference", [])):
            print(f"  BLEU against reference {j} alone ({summary['split']}.ref{j}.txt): {b:.2f}")
        print(f"chrF {summary['chrf']:.2f}  {summary['chrf_signature']}")
        print(
            f"({summary['examples']} sentences, {summary['references_per_sentence']} references each, "
            f"{summary['trimmed_sources']} sources trimmed to max_length, "
            f"{summary['byte_fallback_tokens']} byte-fallback tokens for characters outside the vocabulary)"
        )


def define_flags() -> None:
    """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
    config_flags.DEFINE_config_file("config", None, "The config the model was trained with.")
    flags.DEFINE_string("workdir", None, "The training workdir (checkpoints, spm.model).")
    flags.DEFINE_string("split", "test", "Split to evaluate.")
    flags.DEFINE_integer("beam_size", 4, "Beam size for translation (1 = greedy).")
    flags.DEFINE_float("alpha", 0.6, "GNMT length-penalty exponent.")
    flags.DEFINE_integer("max_examples", 0, "Translate at most this many examples (0 = all).")
    flags.DEFINE_integer("batch_size", 0, "Sentences per decoding batch (0 = the config's batch_size).")
    flags.DEFINE_integer("checkpoint_step", -1, "Checkpoint step to evaluate (-1 = newest).")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=experiment.parse_flags)
