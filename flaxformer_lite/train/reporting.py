"""What a training run reports: metrics.jsonl, TensorBoard events, loss.png, and the metric window."""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys
import time

import jax
import numpy as np
from absl import logging

from flaxformer_lite.train.runtime import TrainingError


class _LogFile(pylogging.FileHandler):
    """A log file that, when it cannot be written (a full disk), says so once and stops.

    logging's default prints a traceback to stderr for every record after that.
    """

    failed = False

    def emit(self, record) -> None:
        if not self.failed:  # records already on their way from other threads when it failed
            super().emit(record)

    def handleError(self, record) -> None:
        if self.failed:
            return
        self.failed = True
        pylogging.getLogger().removeHandler(self)
        reason = sys.exc_info()[1]
        reason = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        logging.warning(
            "cannot write the log file %s (%s); logging to the console only", self.baseFilename, reason
        )


def log_to_file(path: str) -> None:
    """Every log record, library tracebacks included, also to `path` (appended)."""
    handler = _LogFile(path)
    handler.setFormatter(
        pylogging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s")
    )
    pylogging.getLogger().addHandler(handler)


class Logger:
    """metrics.jsonl (append) and TensorBoard events, written by process 0 only."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            path = os.path.join(workdir, "metrics.jsonl")
            _drop_rows_after(path, resume_step)
            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self.jsonl = open(path, "a")

    def write(self, step: int, prefix: str, values: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in values.items() if np.ndim(v) == 0 and not isinstance(v, str)}
        for k, v in scalars.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def _drop_rows_after(path: str, step: int) -> None:
    """Forget metrics.jsonl rows past the step a run resumes from (they are about to be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if _step_of(line) <= step]
    if len(keep) < len(lines):
        logging.info("metrics.jsonl: %d rows after step %d will be recomputed", len(lines) - len(keep), step)
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def _step_of(line: str) -> float:
    """A row's step; a partial row (the writer stopped mid-line: a full disk, kill -9) counts as
    past every step, so it is dropped and recomputed."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def plot_losses(workdir: str) -> None:
    """loss.png from metrics.jsonl: train and eval NLL per token against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, key in (("train", "nll"), ("eval", "nll")):  # same quantity: unsmoothed NLL
        pts = sorted((r["step"], r[key]) for r in rows if r["split"] == split and key in r)
        if pts:
            ax.plot(*zip(*pts, strict=True), label=f"{split} {key}", marker="." if split == "eval" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title(os.path.basename(os.path.abspath(workdir)))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "loss.png"), dpi=100)
    plt.close(fig)


EXPLODING = 3.0  # a loss above this multiple of the run's median so far counts as diverging


class MetricsWindow:
    """Step metrics kept on device until a sync; a sync stops the run on a non-finite loss."""

    def __init__(self, step: int, carried: list | None = None):
        """carried: the steps since the last logged row, from before the run was stopped (`load_window`),
        so the first row after a resume averages the same steps as an uninterrupted run's."""
        self.pending, self.last_time = list(carried or []), time.time()
        self.carried = len(self.pending)  # not timed by this process: left out of tokens/s
        self.healthy_losses = []  # the mean loss of every healthy sync so far (this process's run)
        self.healthy = True  # whether the last sync's loss was healthy

    def _is_healthy(self, loss: float) -> bool:
        """Finite and not exploding: at most EXPLODING x the median of the healthy syncs so far."""
        history = self.healthy_losses
        return bool(np.isfinite(loss)) and (not history or loss <= EXPLODING * np.median(history))

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))

    def _fetch(self, last_good) -> list:
        """The pending steps' metrics on the host (kept pending); a TrainingError on a non-finite loss
        after `last_good()` (which sets diverged checkpoints aside and names the one a rerun resumes from)."""
        self.pending = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in self.pending]
        for s, m in self.pending:
            if not np.isfinite(m["loss"]):
                raise TrainingError(
                    f"loss became {m['loss']} at step {s}; a rerun resumes from the last healthy checkpoint "
                    f"({last_good()}). Lower learning_rate, enable clip_norm, or check the data."
                )
        return self.pending

    def peek(self, last_good) -> dict:
        """The mean loss of the steps since the last sync and whether it is healthy, without
        ending the window (a checkpoint between logged rows)."""
        fetched = self._fetch(last_good)
        if not fetched:
            return {}
        loss = float(np.mean([m["loss"] for _, m in fetched]))
        self.healthy = self._is_healthy(loss)
        return {"loss": loss}

    def sync(self, step: int, last_good, data_wait_s: float = 0.0) -> dict:
        """Mean metrics since the last sync, with tokens/s and steps/s measured on the host, and
        `data_wait`: the fraction of that time the loop waited for its input (`data_wait_s`)."""
        fetched = self._fetch(last_good)
        timed, self.pending, self.carried = fetched[self.carried :], [], 0
        if not fetched:
            return {}
        elapsed = max(time.time() - self.last_time, 1e-9)
        summary = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        summary["tokens_per_sec"] = sum(m["tokens"] for _, m in timed) / elapsed
        summary["steps_per_sec"] = len(timed) / elapsed
        summary["data_wait"] = min(data_wait_s / elapsed, 1.0)
        self.last_time = time.time()
        self.healthy = self._is_healthy(summary["loss"])
        if self.healthy:
            self.healthy_losses.append(summary["loss"])
        return summary

    def save(self, workdir: str, step: int) -> None:
        """Keep the steps since the last logged row beside the checkpoint of `step` (see `load_window`)."""
        path = _window_path(workdir)
        with open(path + ".tmp", "w") as f:
            json.dump({"step": step, "pending": self.pending}, f)
        os.replace(path + ".tmp", path)


def _window_path(workdir: str) -> str:
    return os.path.join(workdir, f"metrics_window.{jax.process_index()}.json")


def load_window(workdir: str, step: int) -> list:
    """The steps since the last logged row that a run stopped at `step` saved (none otherwise)."""
    try:
        with open(_window_path(workdir)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return []
    return [(s, m) for s, m in saved["pending"]] if saved.get("step") == step else []
