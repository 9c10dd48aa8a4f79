"""Compiler figures for context parallelism (issue 40): gpt2_small's train step on a TPU v6e 2x4,
compiled on this CPU machine, against the length T, the context axis size C, the strategy and
load balancing.

    JAX_PLATFORMS=cpu python -m benchmarks.context_parallel --points=524288:8:all_gather:0 \
        --out=docs/results/context_parallel
    python -m benchmarks.context_parallel --table --out=docs/results/context_parallel

Each point is one `flaxformer_lite.tools.aot` compile (batch 1, remat_policy=full, scan_layers),
appended to <out>/compiles.jsonl as it finishes; a rerun skips the points already there. Beside the
compiler's memory and collectives, closed forms per device: the query-key blocks (512 x 512) the
causal mask leaves visible on each device (the others are skipped at run time, which XLA's cost
analysis cannot see), their train-step attention FLOPs (18 x 512^2 x heads x head dim x layers per
block) on the busiest device, and the busiest over the mean: the imbalance load balancing removes.
Compiler figures, not measured speed.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import append_row, done_keys, load_config
from flaxformer_lite.ops import context_parallel as cp
from flaxformer_lite.tools import aot, aot_targets
from flaxformer_lite.train import run_config

flags.DEFINE_list(
    "points",
    ["32768:8:all_gather:0", "524288:8:all_gather:0", "524288:8:ring:1"],
    "T:C:strategy:balance points to compile (balance 0 or 1).",
)
flags.DEFINE_string("target", "tpu:v6e:2x4", "The compile target.")
flags.DEFINE_string("out", "docs/results/context_parallel", "Folder of compiles.jsonl.")
flags.DEFINE_list(
    "ingest",
    [],
    "Logs of `python -m flaxformer_lite.tools.aot` runs to add (strategy and balance from the file name: "
    "'ring' in it = ring, '_lb' = load balanced).",
)
flags.DEFINE_bool("table", False, "Print the markdown table of compiles.jsonl instead of compiling.")
FLAGS = flags.FLAGS


def block_work(T: int, context: int, balance: bool, chunk: int = 512) -> np.ndarray:
    """[C] query-key blocks (chunk x chunk) each device computes for one unpacked causal row: the
    blocks a causal mask does not wholly hide (the others are skipped), with the row in the order
    it is sharded (load-balanced or not). Both strategies visit the same blocks."""
    pos = np.arange(T)
    if balance:
        pos = pos[cp.load_balance_order(T, context)]
    blocks = pos.reshape(T // chunk, chunk)
    visible = blocks.min(1)[None, :] <= blocks.max(1)[:, None]  # [query block, key block]
    return visible.reshape(context, -1, T // chunk).sum(axis=(1, 2))


def attention_flops(blocks: int, cfg, chunk: int = 512) -> float:
    """Train-step attention FLOPs of `blocks` blocks: per head 18 chunk^2 H (forward QK and PV,
    backward 3 matmuls for dq and 4 for dk, dv), every layer."""
    return 18.0 * chunk * chunk * cfg.num_heads * cfg.head_dim * cfg.num_decoder_layers * blocks


def _closed_forms(config, T: int, C: int, strategy: str, balance: bool, target: str) -> dict:
    work = block_work(T, C, balance)
    cfg = run_config.model_config(config, config.vocab_size)
    return dict(
        key=f"{target}|{T}|{C}|{strategy}|{int(balance)}", length=T, context=C, strategy=strategy,
        load_balance=balance, attention_flops_busiest_device=attention_flops(work.max(), cfg),
        block_work_per_device=work.tolist(), causal_imbalance=float(work.max() / work.mean()),
    )  # fmt: skip


def _config(T: int, C: int, strategy: str, balance: bool, devices: int):
    config = load_config("configs/gpt2_small.py")
    config.update(dict(max_length=T, batch_size=1, mesh_data=devices // C, mesh_context=C))
    config.update(dict(context_strategy=strategy, context_load_balance=balance))
    config.model.overrides.update(dict(remat_policy="full", scan_layers=True, memory_length=0))
    return config


def _append(path: str, row: dict) -> None:
    append_row(path, row)
    print(row["key"], "fits" if row["fits"] else "does not fit", flush=True)


def ingest(path: str, logs: list[str]) -> None:
    """Rows from the JSON lines the aot command printed (the same compile, run from the shell)."""
    for log in logs:
        with open(log) as f:
            for line in f:
                if line.startswith("{"):
                    r = json.loads(line)
                    mesh, flags_ = r["mesh"], os.path.basename(log)
                    strategy = "ring" if "ring" in flags_ else "all_gather"
                    balance = "_lb" in flags_
                    config = _config(r["length"], mesh["context"], strategy, balance, r["devices"])
                    forms = _closed_forms(
                        config, r["length"], mesh["context"], strategy, balance, r["target"]
                    )
                    _append(path, {**r, **forms, "source": f"python -m flaxformer_lite.tools.aot ({flags_})"})


def run(path: str) -> None:
    done = done_keys(path)
    target = aot_targets.parse(FLAGS.target)
    devices = aot_targets.devices(target)
    for point in FLAGS.points:
        T, C, strategy, balance = point.split(":")
        T, C, balance = int(T), int(C), bool(int(balance))
        config = _config(T, C, strategy, balance, len(devices))
        forms = _closed_forms(config, T, C, strategy, balance, FLAGS.target)
        if forms["key"] in done:
            continue
        start = time.perf_counter()
        try:
            row = aot.compile_for(config, target, devices, "train_step")
        except aot.DoesNotFit as e:
            row = {"target": FLAGS.target, "fits": False, "error": str(e)}
        _append(path, {**row, **forms, "sweep_seconds": round(time.perf_counter() - start, 1)})


def table(path: str) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    print("| target | T | context | strategy | load balance | GiB/device (args + temp) | fits | "
          "collectives | "
          "attention TFLOPs (busiest device) | causal blocks max/mean | compile s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["length"], r["context"], r["strategy"], r["load_balance"])):
        b = r.get("per_device_bytes")
        memory = (
            f"{gib(b['total'])} ({gib(b['arguments'])} + {gib(b['temp'])})" if b else r.get("error", "")[:120]
        )
        collectives = ", ".join(f"{k} x{n}" for k, n in r.get("collectives", {}).items())
        balance = "yes" if r["load_balance"] else "no"
        if r["context"] == 1:  # no context parallelism: the one-chip program (splash on TPU)
            r["strategy"], balance = "(one chip)", "-"
        print(f"| {r['target']} | {r['length']} | {r['context']} | {r['strategy']} | {balance} | "
              f"{memory} | {'yes' if r['fits'] else 'no'} | {collectives} | "
              f"{r['attention_flops_busiest_device'] / 1e12:.1f} | {r['causal_imbalance']:.2f} | "
              f"{r.get('compile_seconds', '')} |")  # fmt: skip


def main(argv):
    del argv
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, "compiles.jsonl")
    if FLAGS.ingest:
        ingest(path, FLAGS.ingest)
    elif FLAGS.table:
        table(path)
    else:
        run(path)


if __name__ == "__main__":
    app.run(main)
