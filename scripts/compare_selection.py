"""Test BLEU/chrF of the ways to pick a model from one run: last, best by validation, averages, EMA.

    python scripts/compare_selection.py --config=configs/quickstart.py --workdir=runs/select \
        --out=docs/results/model_selection/quickstart.json

The run must have been trained with --config.valid_metric (and keep_best >= 5 for "average of
best 5"). Every variant is scored by the same eval.py command (beam 4, alpha 0.6, the test split);
averages are written with `python -m flaxformer_lite.tools.average` first. Variants whose inputs the
run lacks (no EMA kept) are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args) -> float:
    start = time.time()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True)
    return time.time() - start


def _eval(config, workdir, name, *flags) -> dict:
    out = os.path.join(workdir, "selection", name)
    seconds = _run(
        "eval.py", f"--config={config}", f"--workdir={workdir}", "--split=test", f"--output_dir={out}", *flags
    )
    summary = json.load(open(next(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".json"))))
    keys = ("checkpoint_step", "bleu", "chrf", "perplexity", "repeated_3gram_share")
    return {
        "variant": name,
        "flags": list(flags),
        "eval_seconds": round(seconds, 1),
        **{k: summary[k] for k in keys},
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    rows = [
        _eval(a.config, a.workdir, "last", "--weights=raw"),
        _eval(a.config, a.workdir, "best", "--checkpoint=best", "--weights=raw"),
    ]
    for how in ("--last=5", "--best=5"):
        seconds = _run(
            "-m", "flaxformer_lite.tools.average", f"--config={a.config}", f"--workdir={a.workdir}", how
        )
        row = _eval(
            a.config,
            a.workdir,
            f"average {how[2:].replace('=', ' ')}",
            "--checkpoint=averaged",
            "--weights=raw",
        )
        rows.append({**row, "average_seconds": round(seconds, 1)})
    last = os.path.join(a.workdir, "checkpoints")
    newest = max(int(d) for d in os.listdir(last) if d.isdigit())
    if os.path.isdir(os.path.join(last, str(newest), "ema")):
        rows.append(_eval(a.config, a.workdir, "ema (last)", "--weights=ema"))
        rows.append(_eval(a.config, a.workdir, "ema (best)", "--checkpoint=best", "--weights=ema"))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"config": a.config, "workdir": a.workdir, "rows": rows}, f, indent=1)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
