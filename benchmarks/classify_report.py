"""The tables and plots of benchmarks/classify_pretraining.py's runs (docs/results/classify/).

table.md: test accuracy and F1 (mean ± sample standard deviation over seeds, and the seed count) of
every model by training data and labelled examples, on both test sets, beside the majority class and
the word-overlap regression (overlap_baseline.json); curve.png: accuracy against labelled examples;
pretraining.png: the pretraining runs' validation loss against steps.
"""

from __future__ import annotations

import collections
import json
import os
import statistics

from benchmarks.classify_pretraining import MODELS, PRETRAINED

LABELS = {
    "scratch_enc": "encoder, from scratch",
    "mlm": "encoder, MLM-pretrained",
    "mlm_nsp": "encoder, MLM+NSP-pretrained",
    "scratch_dec": "decoder, from scratch",
    "lm": "decoder, LM-pretrained",
}
TESTS = ("original", "adversarial")


def _rows(out: str) -> list[dict]:
    path = os.path.join(out, "runs.jsonl")
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def _groups(rows: list[dict]) -> dict:
    """(model, data, size) -> the rows of its seeds."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["model"], r["data"], r["size"])].append(r)
    return groups


def _stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _baselines(out: str) -> list[str]:
    path = os.path.join(out, "overlap_baseline.json")
    if not os.path.exists(path):
        return []
    b = json.load(open(path))
    sets = {"original": "bible_paraphrase test", "adversarial": "bible_paraphrase/adversarial test"}
    lines = []
    for fit, data in (("fit_on_original", "original"), ("fit_on_adversarial", "adversarial")):
        if fit not in b:
            continue
        for name, label in (
            ("majority_class", "majority class"),
            ("word_overlap_logistic", "word-overlap regression"),
        ):
            cells = []
            for test in TESTS:
                s = b[fit].get(sets[test], {}).get(name)
                cells.append(f"{s['accuracy']:.3f} / {s['f1']:.3f}" if s else "")
            lines.append(f"| {label} | {data} | all | - | {' | '.join(cells)} |")
    return lines


def table(out: str) -> str:
    groups = _groups(_rows(out))
    lines = [
        "| model | fine-tuned on | labelled pairs | seeds | original test: accuracy / F1 "
        "| adversarial test: accuracy / F1 |",
        "|---|---|---|---|---|---|",
        *_baselines(out),
    ]
    order = {m: i for i, m in enumerate(MODELS)}
    size_key = lambda s: float("inf") if s == "all" else int(s)  # noqa: E731
    for model, data, size in sorted(groups, key=lambda g: (g[1] != "original", size_key(g[2]), order[g[0]])):
        rows = groups[(model, data, size)]
        cells = []
        for test in TESTS:
            acc = [r[f"test_{test}"]["accuracy"] for r in rows]
            f1 = [r[f"test_{test}"]["f1"] for r in rows]
            cells.append(f"{_stat(acc)} / {_stat(f1)}")
        lines.append(f"| {LABELS[model]} | {data} | {size} | {len(rows)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _overlap_curve(out: str, data: str) -> list[tuple[int, float]]:
    """(training pairs, test accuracy) of the word-overlap regression fit on fewer original pairs."""
    path = os.path.join(out, "overlap_baseline.json")
    if data != "original" or not os.path.exists(path):
        return []
    points = []
    for fit, result in json.load(open(path)).items():
        if fit.startswith("fit_on_original"):
            n = int(result["trained_on"].split("(")[1].split()[0])
            points.append((n, result["bible_paraphrase test"]["word_overlap_logistic"]["accuracy"]))
    return sorted(points)


def plot_curve(out: str, path: str) -> None:
    """Test accuracy (mean, error bar = standard deviation) against labelled examples, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(out)
    groups = _groups(rows)
    sizes = {d: {r["size"] for r in rows if r["data"] == d} for d in ("original", "adversarial")}
    datas = [d for d, s in sizes.items() if len(s) > 1]  # a curve needs two sizes (table.md has the rest)
    fig, axes = plt.subplots(1, max(1, len(datas)), figsize=(8.5 * max(1, len(datas)), 4), squeeze=False)
    for ax, data in zip(axes[0], datas, strict=False):
        for model in MODELS:
            points = []
            for (m, d, size), rs in groups.items():
                if m == model and d == data:
                    n = rs[0]["train_examples"] if size == "all" else int(size)
                    acc = [r[f"test_{data}"]["accuracy"] for r in rs]
                    points.append((n, statistics.mean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0))
            if points:
                xs, ys, es = zip(*sorted(points), strict=True)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=LABELS[model])
        overlap = _overlap_curve(out, data)
        if overlap:
            ax.plot(*zip(*overlap, strict=True), "k--", marker="x", label="word-overlap regression")
        ax.axhline(0.5, color="grey", linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.set_xlabel(f"labelled training pairs ({data})")
        ax.set_ylabel(f"{data} test accuracy")
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_pretraining(root: str, path: str) -> None:
    """Validation loss (nats per scored token) against steps of each pretraining run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model, name in PRETRAINED.items():
        metrics = os.path.join(root, name, "metrics.jsonl")
        if not os.path.exists(metrics):
            continue
        rows = [json.loads(line) for line in open(metrics)]
        evals = [(r["step"], r["nll"]) for r in rows if r.get("split") == "eval"]
        if evals:
            what = "(MLM + NSP) / 2, as the loop mixes them" if model == "mlm_nsp" else "validation"
            ax.plot(*zip(*evals, strict=True), marker="o", label=f"{LABELS[model]}: {what}")
    ax.set_xlabel("pretraining step (32 rows x 128 tokens)")
    ax.set_ylabel("validation loss (nats per scored token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(out: str, root: str) -> None:
    text = table(out)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    plot_curve(out, os.path.join(out, "curve.png"))
    plot_pretraining(root, os.path.join(out, "pretraining.png"))
    print(text)
