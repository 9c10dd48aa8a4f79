"""Evaluation shared by train.py and eval.py: perplexity over a split, BLEU/chrF on decoded text."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from flaxformer_lite import decoding, sharding
from flaxformer_lite.data import pipeline as ip
from flaxformer_lite.evaluation import corpus_metrics
from flaxformer_lite.tasks import Task
from flaxformer_lite.train import training

# Jitted once per (model, task): Linen modules hash by value, so repeated evaluations during
# training reuse the compiled programs instead of recompiling for every new closure.
_eval_step = jax.jit(sharding.under_rules(training.eval_step), static_argnames=("model", "task"))
_greedy_translate = jax.jit(
    sharding.under_rules(
        lambda params, inputs, *, model, max_len: decoding.translate(model, params, inputs, max_len)
    ),
    static_argnames=("model", "max_len"),
)


def evaluate(
    exp,
    params,
    *,
    split: str | None = None,
    max_batches: int = 0,
    bleu_examples: int | None = None,
    **bleu_kwargs,
) -> dict:
    """Loss and perplexity of an experiment's model on `split` (default: the config's eval split).

    For translation tasks with `bleu_examples` set (0 = all) also BLEU/chrF of decoded text
    (greedy unless `decode_fn` is given), with the hypotheses, sources and references.
    """
    c = exp.config
    split = split or c.eval_split
    model = exp.inference_model
    result = evaluate_loss(params, model, exp.task, exp.eval_dataset(split), exp.mesh, max_batches)
    if exp.task.translates and bleu_examples is not None:
        options = dict(
            max_length=c.max_length, max_decode_length=c.max_decode_length, batch_size=c.batch_size
        )
        options.update(bleu_kwargs)
        source = exp.data.open(split)
        result.update(
            evaluate_bleu(
                model,
                params,
                exp.tokenizer,
                source,
                exp.data.keys,
                max_examples=bleu_examples,
                mesh=exp.mesh,
                **options,
            )
        )
    return result


def evaluate_loss(params, model, task: Task, batches, mesh, max_batches: int = 0) -> dict:
    """Token-level NLL, perplexity and accuracy over `batches` (all of them if max_batches is 0)."""
    step = functools.partial(_eval_step, model=model, task=task)
    totals = {"nll_sum": 0.0, "weight_sum": 0.0, "correct_sum": 0.0}
    it = batches if not max_batches else itertools.islice(batches, max_batches)
    with jax.set_mesh(mesh):
        for batch in it:
            out = jax.device_get(step(params, sharding.global_batch(batch, mesh)))
            for k in totals:
                totals[k] += float(out[k])
    if totals["weight_sum"] == 0:
        raise ValueError("the evaluation split produced no target tokens; pick a non-empty split.")
    nll = totals["nll_sum"] / totals["weight_sum"]
    return {
        "nll": nll,
        "perplexity": corpus_metrics.perplexity(totals["nll_sum"], totals["weight_sum"]),
        "accuracy": totals["correct_sum"] / totals["weight_sum"],
        "tokens": totals["weight_sum"],
    }


def references(example: dict, target_feature: str) -> list[str]:
    """Every reference of an example: `<target>_refs` when the dataset has them, else the target."""
    refs = example.get(f"{target_feature}_refs")
    if refs is not None and len(refs):
        return [r.decode("utf-8") if isinstance(r, bytes) else str(r) for r in refs]
    value = example[target_feature]
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value)]


def translate_texts(
    model,
    params,
    sp,
    sources: list[str],
    *,
    max_length: int,
    max_decode_length: int,
    batch_size: int,
    mesh,
    decode_fn=None,
) -> tuple[list[str], dict]:
    """Greedy (or `decode_fn`) translations of `sources`; returns (texts, counts).

    counts: sources trimmed to max_length, and byte-fallback tokens (characters the vocabulary lacks).
    """
    if decode_fn is None:
        decode_fn = functools.partial(_greedy_translate, model=model, max_len=max_decode_length)
    tokenize = ip.Tokenize(sp, {"inputs": "text"}, max_length)  # ids + EOS, trimmed and counted
    hyps = []
    with jax.set_mesh(mesh):
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            rows = np.zeros((batch_size, max_length), np.int32)
            for row, text in enumerate(chunk):
                ids = tokenize({"text": text})["inputs"]
                rows[row, : len(ids)] = ids
            # Every process passes the same rows and gets all outputs (they span processes' devices).
            out = decode_fn(params, jax.device_put(jnp.asarray(rows), sharding.batch_sharding(mesh)))
            out = multihost_utils.process_allgather(out, tiled=True)
            hyps += [sp.decode(ids) for ids in decoding.strip_after_eos(out)[: len(chunk)]]
    stats = tokenize.stats
    return hyps, {"trimmed_sources": stats.trimmed, "byte_fallback_tokens": stats.byte_fallback_tokens}


def evaluate_bleu(
    model,
    params,
    sp,
    source,
    keys: dict[str, str],
    *,
    max_examples: int,
    max_length: int,
    max_decode_length: int,
    batch_size: int,
    mesh,
    decode_fn=None,
) -> dict:
    """BLEU/chrF of translations of the first `max_examples` examples (0 = all) of `source`."""
    n = len(source) if not max_examples else min(max_examples, len(source))
    examples = [source[i] for i in range(n)]
    src_texts = [references(ex, keys["inputs"])[0] for ex in examples]
    refs = [references(ex, keys["targets"]) for ex in examples]
    hyps, counts = translate_texts(
        model,
        params,
        sp,
        src_texts,
        max_length=max_length,
        max_decode_length=max_decode_length,
        batch_size=batch_size,
        mesh=mesh,
        decode_fn=decode_fn,
    )
    num_refs = max(len(r) for r in refs)
    # sacrebleu layout: one list per reference index; sentences with fewer references repeat their first.
    ref_streams = [[r[j] if j < len(r) else r[0] for r in refs] for j in range(num_refs)]
    scores = corpus_metrics.bleu_and_chrf(hyps, ref_streams)
    if num_refs > 1:  # also against each reference alone (each translation version of the test set)
        scores["bleu_per_reference"] = [corpus_metrics.bleu_and_chrf(hyps, [r])["bleu"] for r in ref_streams]
    scores["repeated_3gram_share"] = corpus_metrics.repetition_share(hyps)  # hypotheses stuck in a loop
    scores.update(examples=n, references_per_sentence=num_refs, **counts)
    return {**scores, "hypotheses": hyps, "sources": src_texts, "references": ref_streams}
