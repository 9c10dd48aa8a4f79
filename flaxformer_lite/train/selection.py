"""Validation during training: the metric that picks the model, when it is scored, and early stopping.

`valid_metric` names what evaluation result ranks checkpoints: "bleu" or "chrf" (translation,
decoded greedily or with beam search of `valid_beam_size`), "loss" or "perplexity" (any task).
With it set, train.py scores the validation split every `eval_every` steps and at the last step,
saves a checkpoint there carrying the score (`valid_<key>` in the checkpoint's metrics), keeps
the `keep_best` best of them beside the newest ones, and stops after `patience` evaluations
without improvement. The history lives in metrics.jsonl's eval rows, so a resumed run knows it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from flaxformer_lite.cli import need

# valid_metric -> (evaluation result key, which way is better)
METRICS = {
    "loss": ("nll", "min"),
    "perplexity": ("perplexity", "min"),
    "bleu": ("bleu", "max"),
    "chrf": ("chrf", "max"),
}


def check_config(config, task) -> None:
    """valid_metric, valid_beam_size, keep_best, patience, ema_decay (configs/default.py)."""
    name = config.valid_metric
    need(not name or name in METRICS, f"valid_metric={name!r}; use one of {sorted(METRICS)}")
    need(
        name not in ("bleu", "chrf") or task.translates,
        f"valid_metric={name!r} needs a translation task, not task={task.name!r}; use loss or perplexity",
    )
    need(
        not name or config.eval_every > 0,
        f"valid_metric={name!r} needs eval_every > 0 (steps between scores)",
    )
    for field in ("keep_best", "patience"):
        value = config[field]
        need(value >= 0, f"{field}={value} must be >= 0")
        need(not value or name, f"{field}={value} needs a --config.valid_metric to rank by (e.g. bleu)")
        need(not value or config.eval_every > 0, f"{field}={value} needs eval_every > 0")
    need(config.valid_beam_size >= 1, f"valid_beam_size={config.valid_beam_size} must be >= 1")
    need(
        0.0 <= config.ema_decay < 1.0, f"ema_decay={config.ema_decay} must be in [0, 1) (0 = off; e.g. 0.999)"
    )


def metric(config) -> tuple[str, str] | None:
    """(result key, "max" | "min") of the config's valid_metric, or None if it has none."""
    name = config.valid_metric
    return METRICS[name] if name else None


def evaluates_at(config, step: int, is_last: bool) -> bool:
    """Whether train.py scores the validation split after `step`."""
    if not config.eval_every:
        return False
    if metric(config):
        return step % config.eval_every == 0 or is_last
    return step % config.eval_every == 0 and not is_last  # the final evaluation follows the loop


def decodes_at(config, step: int) -> bool:
    """Whether that evaluation decodes text (BLEU/chrF) besides the loss."""
    if config.valid_metric in ("bleu", "chrf"):
        return True
    return bool(config.bleu_every) and step % config.bleu_every == 0


def improves(score: float, best: float | None, mode: str) -> bool:
    """Strictly better than `best` (NaN never is; anything beats no score yet)."""
    if math.isnan(score):
        return False
    return best is None or (score > best if mode == "max" else score < best)


@dataclasses.dataclass
class EarlyStopping:
    """The scores so far, the best one, and whether `patience` evaluations have passed without one."""

    key: str | None
    mode: str
    patience: int
    keep_best: int
    history: list = dataclasses.field(default_factory=list)  # (step, score)

    @classmethod
    def from_log(cls, workdir: str, config, step: int) -> EarlyStopping:
        """Built from the eval rows of metrics.jsonl up to `step` (where the run resumes)."""
        key, mode = metric(config) or (None, "max")
        early = cls(key, mode, config.patience, config.keep_best)
        path = os.path.join(workdir, "metrics.jsonl")
        if key and os.path.exists(path):
            scores = {}
            with open(path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:  # a partial last row: the writer stopped mid-line
                        continue
                    if row.get("split") == "eval" and key in row and row["step"] <= step:
                        scores[row["step"]] = row[key]  # a step evaluated twice (the final eval): once
            early.history = sorted(scores.items())
        return early

    @property
    def keeps_best(self) -> bool:
        return bool(self.key and self.keep_best)

    def add(self, step: int, result: dict) -> dict | None:
        """Record `step`'s evaluation; the scores its checkpoint carries ({"valid_<key>": score})."""
        if not self.key or self.key not in result:
            return None
        self.history.append((step, float(result[self.key])))
        return {f"valid_{self.key}": float(result[self.key])}

    @property
    def best(self) -> tuple[int, float] | None:
        best = None
        for step, score in self.history:
            if improves(score, None if best is None else best[1], self.mode):
                best = (step, score)
        return best

    @property
    def stopped(self) -> bool:
        if not (self.key and self.patience and self.history):
            return False
        best = self.best
        since = len(self.history) if best is None else sum(1 for s, _ in self.history if s > best[0])
        return since >= self.patience

    @property
    def reason(self) -> str:
        best = self.best
        told = f"step {best[0]} ({self.key} {best[1]:.4g})" if best else "none (every score was NaN)"
        kept = " eval.py --checkpoint=best reads it." if self.keep_best else ""
        return (
            f"early stop at step {self.history[-1][0]}: validation {self.key} has not improved for "
            f"{self.patience} evaluations; the best is {told}.{kept}"
        )


@dataclasses.dataclass
class NewestHealthy:
    """orbax preservation policy: never delete the newest checkpoint saved with a healthy loss."""

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        healthy = [i for i, c in enumerate(checkpoints) if (c.metrics or {}).get("healthy", 1.0) > 0]
        return [bool(healthy) and i == healthy[-1] for i in range(len(checkpoints))]


def best_steps(scores: list[tuple[int, float]], mode: str, n: int) -> list[int]:
    """The `n` best steps of (step, score) pairs, best first: highest scores for mode "max", lowest
    for "min"; NaN ranks last; of equal scores the earlier step ranks first (it got there first)."""

    def key(item):
        step, score = item
        nan = score != score
        return (nan, 0.0 if nan else (-score if mode == "max" else score), step)

    return [step for step, _ in sorted(scores, key=key)[:n]]


@dataclasses.dataclass
class BestScores:
    """orbax preservation policy: keep the `n` steps with the best validation `metric`."""

    metric: str
    mode: str
    n: int

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        scored = [(i, (c.metrics or {}).get(self.metric)) for i, c in enumerate(checkpoints)]
        keep = set(best_steps([(i, v) for i, v in scored if v is not None and v == v], self.mode, self.n))
        return [i in keep for i in range(len(checkpoints))]
