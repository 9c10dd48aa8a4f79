"""Sparse attention patterns compiled for a TPU from this CPU machine: blocks skipped and FLOPs.

    JAX_PLATFORMS=cpu python -m benchmarks.attention_patterns_aot --lengths=16384,32768,65536
    JAX_PLATFORMS=cpu python -m benchmarks.attention_patterns_aot --table

GPT-2 small (decoder-only, causal) at batch 1, remat full, scan over layers, on one TPU v6e chip
(as benchmarks/aot_targets.py's long_context sweep), with splash attention and each pattern as a
computable mask. Each row: the compiler's memory and XLA FLOPs (`tools/aot.py`), and the splash
blocks that run, counted from splash's own mask processing (`fused.splash_block_counts`). The
attention FLOPs are ours, from those counts: XLA's cost analysis does not see inside the kernels.
Rows go to <out>/patterns_aot.jsonl as they finish; a rerun skips rows already there.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from benchmarks.common import append_row, done_keys, load_config
from flaxformer_lite import config as model_config
from flaxformer_lite.ops import fused
from flaxformer_lite.tools import aot, aot_targets

flags.DEFINE_list("lengths", ["16384", "32768", "65536"], "Sequence lengths.")
flags.DEFINE_list("patterns", ["causal", "longformer", "bigbird"], "Which patterns.")
flags.DEFINE_string("target", "tpu:v6e:1x1", "The TPU target.")
flags.DEFINE_string("out", "docs/results/long_documents", "Folder of patterns_aot.jsonl.")
flags.DEFINE_bool("table", False, "Print the markdown table of the file instead of compiling.")
FLAGS = flags.FLAGS

# Longformer: a 512-token left window (causal) and 128 global tokens; BigBird: blocks of 512, its
# three-block window (self and one each side, the right one cut by causality), one global block,
# three random blocks per query block.
PATTERNS = {
    "causal": {},
    "longformer": dict(attention_pattern="longformer", pattern_window=512, global_tokens=128),
    "bigbird": dict(
        attention_pattern="bigbird", pattern_window=1024, global_tokens=512, pattern_block=512,
        random_blocks=3, pattern_seed=0,
    ),
}  # fmt: skip
# Matmuls per computed block: forward q k^T and p v; dq kernel q k^T, dO v^T, dS k; dkv kernel
# q k^T, p^T dO, dO v^T, dS^T q.
MATMULS = 2 + 3 + 4


def _row(name: str, T: int, target, devices) -> dict:
    config = load_config("configs/gpt2_small.py")
    config.update({"batch_size": 1, "max_length": T})
    model = {"scan_layers": True, "remat_policy": "full", "memory_length": 0, **PATTERNS[name]}
    config.model.overrides.update(model)
    start = time.perf_counter()
    row = aot.compile_for(config, target, devices, "train_step")
    seconds = time.perf_counter() - start
    cfg = model_config.gpt2_small(**{k: v for k, v in model.items() if k != "remat_policy"})
    kept, total, block = fused.splash_block_counts(T, T, is_causal=True, pattern=cfg.pattern)
    flops = cfg.num_decoder_layers * cfg.num_heads * kept * MATMULS * 2 * block * block * cfg.head_dim
    row.update(
        key=f"{name}|{T}", pattern=name, model_overrides=model, splash_block=block,
        blocks_computed=kept, blocks_total=total, attention_kernel_flops=flops,
        step_flops=row["xla_flops_per_device"] + flops, sweep_seconds=round(seconds, 1),
    )  # fmt: skip
    row.pop("flops_per_step", None)  # scan_layers: XLA counts one layer; see xla_flops_per_device
    return row


def run() -> None:
    path = os.path.join(FLAGS.out, "patterns_aot.jsonl")
    os.makedirs(FLAGS.out, exist_ok=True)
    done = done_keys(path)
    target = aot_targets.parse(FLAGS.target)
    devices = aot_targets.devices(target)
    for T in (int(t) for t in FLAGS.lengths):
        for name in FLAGS.patterns:
            if f"{name}|{T}" in done:
                continue
            row = _row(name, T, target, devices)
            append_row(path, row)
            print(row["key"], row["blocks_computed"], row["blocks_total"], row["sweep_seconds"], flush=True)


def table() -> None:
    """Markdown: blocks and FLOPs per step (the rest of the model from flops.py's closed form, as
    XLA counts a scanned layer once: model_flops_per_step less its attention scores)."""
    with open(os.path.join(FLAGS.out, "patterns_aot.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    causal = {r["length"]: r for r in rows if r["pattern"] == "causal"}
    print("| T | pattern | splash blocks run / all | vs causal | attention TFLOPs (kernels) | "
          "rest TFLOPs | step TFLOPs | GiB/chip | compile s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["length"], list(PATTERNS).index(r["pattern"]))):
        base = causal.get(r["length"])
        ratio = f"{r['blocks_computed'] / base['blocks_computed']:.3f}" if base else ""
        rest = r["model_flops_per_step"] - r["fused_attention_flops"]
        attention = r["attention_kernel_flops"]
        print(
            f"| {r['length']} | {r['pattern']} | {r['blocks_computed']} / {r['blocks_total']} | {ratio} | "
            f"{attention / 1e12:.1f} | {rest / 1e12:.1f} | {(attention + rest) / 1e12:.1f} | "
            f"{r['per_device_bytes']['total'] / 2**30:.2f} | {r['compile_seconds']} |"
        )


def main(argv) -> None:
    del argv
    table() if FLAGS.table else run()


if __name__ == "__main__":
    app.run(main)
