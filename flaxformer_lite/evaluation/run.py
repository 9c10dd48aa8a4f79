"""Evaluate a trained workdir (or an imported transformers model) on a split: what eval.py runs."""

from __future__ import annotations

import json
import os

from flaxformer_lite import decoding, files, tasks
from flaxformer_lite.evaluation import ensemble, split_metrics
from flaxformer_lite.train import experiment


def evaluate_workdir(config, workdir: str, split: str, *, beams: int, alpha: float, max_examples: int,
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
    if exp.task.classifies:  # accuracy, F1, loss; predictions with probabilities (classify_metrics.py)
        from flaxformer_lite.evaluation import classify_metrics

        summary = {"split": split, "checkpoint_step": step, "checkpoint": checkpoint, "weights": weights,
                   "dataset": config.dataset_name}  # fmt: skip
        out_dir = output_dir or os.path.join(workdir, "eval")
        return classify_metrics.evaluate_and_write(exp, params, split, out_dir=out_dir, summary=summary,
                                                max_examples=max_examples)  # fmt: skip
    decode = None
    if exp.task.translates:
        decode = _decode_fn(
            exp, params, beams=beams, alpha=alpha, length_penalty=length_penalty, members=members,
            ensemble_mode=ensemble_mode, checkpoint=checkpoint, weights=weights,
        )  # fmt: skip
    max_batches = -(-max_examples // exp.host_batch_size) if max_examples else 0
    result = split_metrics.evaluate(
        exp, params, split=split, max_batches=max_batches, bleu_examples=max_examples, decode_fn=decode,
        batch_size=batch_size or config.batch_size,
    )  # fmt: skip
    if config.long_document_strides or config.long_document_memory:  # an LM on whole documents
        result["long_documents"] = _long_documents(exp, params, split)
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
    if config.init_from_hf:
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


def _long_documents(exp, params, split: str) -> dict:
    """Strided perplexity over the whole documents of `split` (evaluation/long_documents.py)."""
    from flaxformer_lite.evaluation import long_documents

    window = exp.config.long_document_window or exp.config.max_length
    strides = long_documents.parse_strides(exp.config.long_document_strides, window)
    memories = long_documents.parse_lengths(exp.config.long_document_memory, "long_document_memory")
    return long_documents.evaluate(exp, params, split, window=window, strides=strides, memories=memories)


def _lines(lines: list[str]) -> str:
    return "".join(line.replace("\n", " ") + "\n" for line in lines)


def long_documents_lines(result: dict) -> str:
    """What eval.py prints of `long_documents.evaluate`'s result: a line per stride."""
    lines = [
        f"long documents ({result['documents']} whole documents, {result['document_tokens']} tokens; "
        f"strided: window {result['window']}):"
    ]
    for stride, r in result["strided"].items():
        lines.append(f"  strided, stride {stride}: perplexity {r['perplexity']:.2f} ({r['windows']} windows)")
    for memory, r in result.get("memory", {}).items():
        lines.append(
            f"  segments of {result['segment_length']} with memory {memory}: perplexity {r['perplexity']:.2f}"
        )
    return "\n".join(lines)


def print_summary(summary: dict) -> None:
    if "f1" in summary:  # a classification task
        from flaxformer_lite.evaluation import classify_metrics

        print(classify_metrics.describe(summary))
        return
    print(f"{summary['split']} (step {summary['checkpoint_step']}): perplexity {summary['perplexity']:.2f}")
    if "long_documents" in summary:
        print(long_documents_lines(summary["long_documents"]))
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
