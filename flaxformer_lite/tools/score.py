"""Score given texts with a trained model: log P(target | source) per pair, or log P(text) for an LM.

    printf 'In the beginning\tIm Anfang\n' | python -m flaxformer_lite.tools.score \
        --config=configs/quickstart.py --workdir=runs/quickstart           # pairs: source<TAB>target
    python -m flaxformer_lite.tools.score --config=... --workdir=... --split=test --output_format=json

One output line per input line, in order: `logp<TAB>tokens<TAB>perplexity` (tsv) or a JSON
object. logp sums the log-probabilities of the target's pieces and its EOS (tokens counts them);
perplexity is exp(-logp / tokens). Sentences are packed into rows (several per row, as in
training) and scored by one teacher-forced forward pass per batch, no decoding: fast enough to
filter a corpus. A line the model cannot score whole (longer than max_length, empty, or a pair
without a tab) is reported on its line and counted on stderr, never trimmed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from flaxformer_lite import cli, sharding
from flaxformer_lite.ids import EOS_ID
from flaxformer_lite.model.models import variant
from flaxformer_lite.train import experiment


def segment_log_probs(params, batch: dict, *, model, task, max_segments: int):
    """Sum of target log-probs and token counts per packed sequence: -> ([B, M], [B, M]) with
    M = max_segments + 1 (index j: segment id j; 0 is padding)."""
    model = variant(model, deterministic=True)
    logits, targets, weights = task.forward(model, params, batch, jax.random.key(0))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    gold = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights  # [B, T]
    onehot = jax.nn.one_hot(batch["targets_segment_ids"], max_segments + 1, dtype=jnp.float32)  # [B, T, M]
    return jnp.einsum("bt,btm->bm", gold, onehot), jnp.einsum("bt,btm->bm", weights, onehot)


@dataclasses.dataclass
class Packed:
    """Rows of packed sequences and, per example, its (batch, row, segment id)."""

    batches: list[dict]
    where: dict[int, tuple[int, int, int]]


def pack(
    examples: dict[int, dict[str, list[int]]], *, rows: int, max_length: int, max_segments: int
) -> Packed:
    """First-fit packing of tokenized examples (index -> {feature: ids}) into batches of `rows`
    rows; every feature of an example goes to the same row and segment id."""
    batches, where = [], {}
    order = sorted(examples, key=lambda i: -max(len(v) for v in examples[i].values()))
    features = sorted(next(iter(examples.values())).keys()) if examples else []
    fill = None
    for i in order:
        ex = examples[i]
        if fill is None:
            fill = _empty_batch(features, rows, max_length)
        row = _first_fit(fill, ex, max_length, max_segments)
        if row is None:  # the batch is full: start the next
            batches.append(fill)
            fill = _empty_batch(features, rows, max_length)
            row = _first_fit(fill, ex, max_length, max_segments)
        seg = fill["_segments"][row] = fill["_segments"][row] + 1
        for name, ids in ex.items():
            start = fill["_used"][name][row]
            fill[name][row, start : start + len(ids)] = ids
            fill[f"{name}_segment_ids"][row, start : start + len(ids)] = seg
            fill[f"{name}_positions"][row, start : start + len(ids)] = np.arange(len(ids))
            fill["_used"][name][row] += len(ids)
        where[i] = (len(batches), row, seg)
    if fill is not None:
        batches.append(fill)
    for b in batches:
        del b["_used"], b["_segments"]
    return Packed(batches, where)


def _empty_batch(features, rows: int, max_length: int) -> dict:
    batch = {
        f"{n}{s}": np.zeros((rows, max_length), np.int32)
        for n in features
        for s in ("", "_segment_ids", "_positions")
    }
    batch["_used"] = {n: [0] * rows for n in features}
    batch["_segments"] = [0] * rows
    return batch


def _first_fit(batch: dict, ex: dict, max_length: int, max_segments: int) -> int | None:
    for row in range(len(batch["_segments"])):
        if batch["_segments"][row] < max_segments and all(
            batch["_used"][n][row] + len(ids) <= max_length for n, ids in ex.items()
        ):
            return row
    return None


def score_examples(
    exp,
    params,
    examples: dict[int, dict[str, list[int]]],
    *,
    batch_size: int,
    max_segments: int | None = None,
) -> dict[int, tuple]:
    """(log P, tokens) of each tokenized example (index -> {"inputs"?, "targets": ids with EOS}).

    max_segments: most examples per row (default: the model's; 1 = one per row, padded).
    """
    c = exp.config
    max_segments = max(1, min(max_segments or exp.model.config.max_segments, c.max_length))
    step = jax.jit(
        sharding.under_rules(
            functools.partial(
                segment_log_probs, model=exp.inference_model, task=exp.task, max_segments=max_segments
            )
        )
    )
    packed = pack(examples, rows=batch_size, max_length=c.max_length, max_segments=max_segments)
    sums = []
    with jax.set_mesh(exp.mesh):
        for batch in packed.batches:
            logp, count = step(params, sharding.global_batch(batch, exp.mesh))
            sums.append((np.asarray(jax.device_get(logp)), np.asarray(jax.device_get(count))))
    return {i: (float(sums[b][0][r, s]), int(sums[b][1][r, s])) for i, (b, r, s) in packed.where.items()}


def tokenize_line(exp, text: str) -> tuple[dict[str, list[int]] | None, str]:
    """A line -> ({feature: ids + EOS}, "") or (None, why it cannot be scored)."""
    sp, max_length = exp.tokenizer, exp.config.max_length
    if exp.task.paired:
        parts = text.split("\t")
        if len(parts) != 2:
            return None, f"expected source<TAB>target, got {len(parts)} field(s)"
        fields = dict(zip(("inputs", "targets"), parts, strict=True))
    else:
        fields = {"targets": text}
    ex = {}
    for name, value in fields.items():
        if not value.strip():
            return None, f"empty {name}"
        ids = getattr(sp, f"encode_{name}", sp.encode)(value) + [EOS_ID]
        if len(ids) > max_length:
            return None, f"{name} has {len(ids)} tokens with EOS, more than max_length={max_length}"
        ex[name] = ids
    return ex, ""


def format_score(logp: float | None, tokens: int, error: str, output_format: str) -> str:
    if output_format == "json":
        if error:
            return json.dumps({"error": error})
        return json.dumps(
            {"logp": round(logp, 5), "tokens": tokens, "perplexity": round(math.exp(-logp / tokens), 4)}
        )
    return "\t\t" if error else f"{logp:.5f}\t{tokens}\t{math.exp(-logp / tokens):.4f}"


def run(config, workdir: str, lines, out, err, *, split="", output_format="tsv", batch_size=0,
        checkpoint="last", weights="auto") -> dict:  # fmt: skip
    """Score `lines` (str or bytes; pairs as source<TAB>target for translation), or with `split`
    that split's (source, first reference) pairs, into `out`."""
    exp = experiment.build(config, workdir, tokenizer="load")
    if split:
        lines = _split_lines(exp, split)
    if not (exp.task.translates or exp.task.generates):
        raise ValueError(f"scoring needs a translation or language model; task {exp.task.name!r} is neither.")
    _, params = exp.restore_params(checkpoint=checkpoint, weights=weights)
    counts = {"lines": 0, "unscored": 0, "replaced_bytes": 0}
    examples, errors = {}, {}
    for i, text in enumerate(cli.text_lines(lines, counts)):
        counts["lines"] += 1
        ex, why = tokenize_line(exp, text)
        if ex is None:
            errors[i] = why
        else:
            examples[i] = ex
    scores = (
        score_examples(exp, params, examples, batch_size=batch_size or exp.host_batch_size)
        if examples
        else {}
    )
    for i in range(counts["lines"]):
        logp, tokens = scores.get(i, (None, 0))
        out.write(format_score(logp, tokens, errors.get(i, ""), output_format) + "\n")
    counts["unscored"] = len(errors)
    if errors:
        first = min(errors)
        err.write(
            f"{len(errors)} of {counts['lines']} lines not scored (line {first + 1}: {errors[first]})\n"
        )
    return counts


def define_flags() -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "The config the model was trained with.")
    flags.DEFINE_string("workdir", None, "The training workdir.")
    flags.DEFINE_string("split", "", "Score this split's (source, first reference) pairs instead of stdin.")
    flags.DEFINE_enum("output_format", "tsv", ["tsv", "json"], "tsv: logp<TAB>tokens<TAB>perplexity.")
    flags.DEFINE_integer(
        "batch_size", 0, "Rows per forward pass (0 = the config's batch_size).", lower_bound=0
    )
    flags.DEFINE_string("checkpoint", "last", "last | best | averaged | STEP (as eval.py).")
    flags.DEFINE_enum("weights", "auto", ["auto", "ema", "raw"], "ema: the params' moving average.")
    flags.mark_flags_as_required(["config", "workdir"])


def _split_lines(exp, split: str):
    """A split's examples as score input lines (source<TAB>first reference, or the text)."""
    from flaxformer_lite.evaluation.split_metrics import references

    source = exp.data.open(split)
    for i in range(len(source)):
        fields = [
            references(source[i], exp.data.keys[k])[0] for k in ("inputs", "targets") if k in exp.data.keys
        ]
        yield "\t".join(f.replace("\t", " ").replace("\n", " ") for f in fields)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cli.quiet_console()
    try:
        run(
            f.config, f.workdir, None if f.split else sys.stdin.buffer, sys.stdout, sys.stderr,
            split=f.split, output_format=f.output_format, batch_size=f.batch_size, checkpoint=f.checkpoint,
            weights=f.weights,
        )  # fmt: skip
    except cli.USER_ERRORS as e:
        cli.exit_with_error(e)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
