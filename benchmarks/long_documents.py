"""Long documents at equal budget (issue 39): context length, Transformer-XL memory, sparse patterns.

Trains configs/long_doc.py's LM (RoPE positions, so memory can be read at evaluation) once per run below,
each on the same number of tokens (250 steps of 4,096 tokens of bible_long/chapters), then evaluates
it with eval.py on the held-out test chapters, read whole: strided perplexity at the run's window and
(for the 128-token runs) perplexity with memory M = 0, L, 2L, 4L. Writes each eval summary and the
run's metrics under --out, then `table.md` and `context.png` (perplexity against usable context).
A run whose summary exists is skipped, so an interrupted sweep resumes.

    python -m benchmarks.long_documents --out=docs/results/long_documents/sweep [--runs=ctx128,mem128]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

L = 128
# name -> (config overrides, eval overrides)
RUNS = {
    "ctx128": ({"max_length": 128, "batch_size": 32},
               {"long_document_strides": "64,128", "long_document_memory": "0,128,256,512"}),
    "mem128": ({"max_length": 128, "batch_size": 32, "model.overrides.memory_length": 128},
               {"long_document_strides": "64,128", "long_document_memory": "0,128,256,512"}),
    "ctx512": ({"max_length": 512, "batch_size": 8}, {"long_document_strides": "256,512"}),
    "longformer512": ({"max_length": 512, "batch_size": 8, "model.overrides.attention_pattern": "longformer",
                       "model.overrides.pattern_window": 128, "model.overrides.global_tokens": 16},
                      {"long_document_strides": "256,512"}),
    "bigbird512": ({"max_length": 512, "batch_size": 8, "model.overrides.attention_pattern": "bigbird",
                    "model.overrides.pattern_window": 128, "model.overrides.pattern_block": 64,
                    "model.overrides.global_tokens": 64, "model.overrides.random_blocks": 1},
                   {"long_document_strides": "256,512"}),
    "local512": ({"max_length": 512, "batch_size": 8, "model.overrides.attention_pattern": "local",
                  "model.overrides.pattern_window": 128}, {"long_document_strides": "256,512"}),
    "ctx2048": ({"max_length": 2048, "batch_size": 2}, {"long_document_strides": "1024,2048"}),
}  # fmt: skip


def _flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def run_one(name: str, out: str, data_dir: str, workroot: str) -> dict:
    """Train and evaluate one run; its eval summary plus wall times and the step rate."""
    train_overrides, eval_overrides = RUNS[name]
    workdir = os.path.join(workroot, name)
    common = ["--config=configs/long_doc.py", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
              "--config.model.overrides.position=rope", *_flags(train_overrides)]  # fmt: skip
    start = time.time()
    subprocess.run([sys.executable, "train.py", *common], check=True)
    trained = time.time() - start
    subprocess.run(
        [sys.executable, "eval.py", *common, *_flags(eval_overrides), f"--output_dir={workdir}/eval"],
        check=True,
    )
    summary = json.load(open(os.path.join(workdir, "eval", "bible_long-chapters.test.json")))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rates = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r]
    summary.update(run=name, train_overrides=train_overrides, train_seconds=round(trained, 1),
                   steps_per_sec_median=sorted(rates)[len(rates) // 2] if rates else None,
                   load_after=os.getloadavg()[0])  # fmt: skip
    shutil.copy(os.path.join(workdir, "metrics.jsonl"), os.path.join(out, f"{name}.metrics.jsonl"))
    return summary


def table(results: dict) -> str:
    header = "| run | trained context | attention | strided ppl (window/stride) | memory M: ppl |"
    lines = [header + " steps/s (load) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        o, ld = r["train_overrides"], r["long_documents"]
        strided = "; ".join(f"{ld['window']}/{s}: {v['perplexity']:.2f}" for s, v in ld["strided"].items())
        memory = "; ".join(f"{m}: {v['perplexity']:.2f}" for m, v in ld.get("memory", {}).items()) or "-"
        attention = o.get("model.overrides.attention_pattern", "full")
        if o.get("model.overrides.memory_length"):
            attention += f" + memory {o['model.overrides.memory_length']}"
        rate = r["steps_per_sec_median"]
        rate = f"{rate:.2f} ({r['load_after']:.1f})" if rate else "-"
        lines.append(f"| {name} | {o['max_length']} | {attention} | {strided} | {memory} | {rate} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    """Perplexity against the most context a scored token can see (strided: the window; memory: M + L)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(results.items()):
        ld, color = r["long_documents"], f"C{i}"
        best = min(v["perplexity"] for v in ld["strided"].values())  # the smaller stride
        ax.plot([ld["window"]], [best], "s", color=color, label=f"{name}: strided, window {ld['window']}")
        memory = sorted((int(m) + L, v["perplexity"]) for m, v in ld.get("memory", {}).items())
        if memory:  # segments of L with memory M: a scored token sees at most M + L tokens
            ax.plot(*zip(*memory, strict=True), "o--", color=color, label=f"{name}: memory M, at M + {L}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("most context a scored token sees (tokens)")
    ax.set_ylabel("test perplexity (whole chapters)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/long_documents/sweep")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--workroot", default="runs/long_documents")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    data_dir = os.path.abspath(os.path.join(args.workroot, "tfds"))
    for name in args.runs.split(","):
        path = os.path.join(args.out, f"{name}.json")
        if not os.path.exists(path):
            result = run_one(name, args.out, data_dir, args.workroot)
            with open(path, "w") as f:
                json.dump(result, f, indent=1)
    results = {}
    for name in RUNS:
        path = os.path.join(args.out, f"{name}.json")
        if os.path.exists(path):
            results[name] = json.load(open(path))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(results))
    plot(results, os.path.join(args.out, "context.png"))
    print(table(results))


if __name__ == "__main__":
    main()
