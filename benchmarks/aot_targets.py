"""Compiler figures for real TPU/GPU targets, from this CPU machine: memory, fit, kernels, FLOPs.

    JAX_PLATFORMS=cpu python -m benchmarks.aot_targets --sweep=presets --out=docs/results/aot
    JAX_PLATFORMS=cpu python -m benchmarks.aot_targets --sweep=long_context --out=docs/results/aot
    JAX_PLATFORMS=cpu python -m benchmarks.aot_targets --sweep=sharding --out=docs/results/aot

Each row is one `flaxformer_lite.tools.aot` compile (train step), appended to <out>/<sweep>.jsonl as it
finishes; a rerun skips the rows already there, so a long sweep can be stopped and resumed.
`--table` prints the markdown table of a sweep's file and draws long_context.png.
These are the compilers' own figures (memory analysis, cost analysis, custom calls), not speed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time

import jax
from absl import app, flags

from benchmarks.common import append_row, done_keys, load_config
from flaxformer_lite.tools import aot, aot_targets

flags.DEFINE_enum("sweep", "presets", ["presets", "max_batch", "long_context", "sharding"], "Which sweep.")
flags.DEFINE_string("out", "docs/results/aot", "Folder of the sweeps' JSONL files.")
flags.DEFINE_list("configs", ["wmt_base", "wmt_big", "gpt2_small", "llama_small", "mlm"], "presets sweep.")
flags.DEFINE_list(
    "targets",
    ["tpu:v5e:1x1", "tpu:v5e:2x2", "tpu:v6e:2x2", "tpu:v5p:2x2x1", "gpu:h100x1", "gpu:h100x8", "gpu:h200x1"],
    "Targets of the presets sweep.",
)
flags.DEFINE_bool("scan_layers", True, "Compile with scan_layers=True (one layer body: minutes faster).")
flags.DEFINE_bool("table", False, "Print the sweep's table (and plot) from its file instead of compiling.")
FLAGS = flags.FLAGS


def _rows():
    """(key, config name, target, config overrides, model overrides, search) of the sweep."""
    if FLAGS.sweep == "presets":
        for name, target in itertools.product(FLAGS.configs, FLAGS.targets):
            yield f"{name}|{target}", name, target, {}, {}, False
    elif FLAGS.sweep == "max_batch":  # the largest batch that fits (several compiles each)
        for name, target in itertools.product(FLAGS.configs, FLAGS.targets):
            yield f"{name}|{target}", name, target, {}, {}, True
    elif FLAGS.sweep == "long_context":  # batch 1, one chip: fused kernel vs XLA, remat none / full
        variants = (("fused", "none"), ("xla", "none"), ("fused", "full"))
        for (impl, remat), target, T in itertools.product(
            variants, ("gpu:h100x1", "tpu:v6e:1x1"), (1024, 4096, 16384, 32768, 65536)
        ):
            model = {"attention_impl": "xla"} if impl == "xla" else {}
            model["remat_policy"] = remat
            fields = {"batch_size": 1, "max_length": T}
            yield f"{target}|{T}|{impl}|{remat}", "gpt2_small", target, fields, model, False
    else:  # parameter and optimizer state per device: FSDP against data parallelism, 8 devices
        for target, (data, fsdp) in itertools.product(("gpu:h100x8", "tpu:v5e:2x4"), ((8, 1), (1, 8))):
            fields = {"mesh_data": data, "mesh_fsdp": fsdp}
            yield f"{target}|data{data}|fsdp{fsdp}", "gpt2_small", target, fields, {}, False


def run(path: str) -> None:
    done = done_keys(path)
    devices: dict[str, list] = {}
    for key, name, target_name, fields, model, search in _rows():
        if key in done:
            continue
        target = aot_targets.parse(target_name)
        devices.setdefault(target_name, aot_targets.devices(target))
        config = load_config(f"configs/{name}.py")
        config.update(fields)
        config.model.overrides.update({"scan_layers": FLAGS.scan_layers, **model})
        start = time.perf_counter()
        try:
            fn = aot.find_max_batch if search else aot.compile_for
            row = fn(config, target, devices[target_name], "train_step")
        except aot.DoesNotFit as e:
            row = {"target": target_name, "fits": False, "error": str(e), "batch": config.batch_size}
        seconds = round(time.perf_counter() - start, 1)
        row.update(key=key, config_file=f"configs/{name}.py", overrides={**fields, **model},
                   scan_layers=FLAGS.scan_layers, sweep_seconds=seconds)  # fmt: skip
        append_row(path, row)
        print(key, "fits" if row["fits"] else "does not fit", row.get("max_batch", ""), flush=True)


def _fits(r: dict) -> bool:
    """The row fits its target's usable memory (rows written before `usable_memory_bytes` existed
    were judged against all of a GPU's memory: judged again here)."""
    if "per_device_bytes" not in r:
        return False
    return r["fits"] and r["per_device_bytes"]["total"] <= aot_targets.parse(r["target"]).usable_memory_bytes


def _gib(n) -> str:
    return f"{n / 2**30:.2f}" if n is not None else ""


def table(path: str) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if FLAGS.sweep in ("presets", "max_batch"):
        print("| config | target | batch x length | GiB/device (args + temp) | fits | largest batch | "
              "kernels | model TFLOPs/step | compile s |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            b = r.get("per_device_bytes", {})
            kernels = ", ".join(f"{k} x{n}" for k, n in r.get("attention_kernels", {}).items())
            # flops.py's closed form: XLA's count of a scanned program counts the layer loop's body once
            tflops = f"{r['model_flops_per_step'] / 1e12:.1f}" if r.get("model_flops_per_step") else ""
            needs = r.get("error", "").split(": it needs ")[-1].split(";")[0].split(" (the TPU")[0]
            memory = (
                f"{_gib(b['total'])} ({_gib(b['arguments'])} + {_gib(b['temp'])})" if b else f"needs {needs}"
            )
            print(f"| {r['config_file']} | {r['target']} | {r['batch']} x {r.get('length', '')} | {memory} | "
                  f"{'yes' if _fits(r) else 'no'} | {r.get('max_batch', '')} | {kernels} | {tflops} | "
                  f"{r.get('compile_seconds', '')} |")  # fmt: skip
    elif FLAGS.sweep == "long_context":
        _plot_long_context(rows, os.path.join(os.path.dirname(path), "long_context.png"))
        print("| target | T | attention | remat | temp GiB | total GiB | fits |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted(
            rows, key=lambda r: (r["key"].split("|")[0], r["key"].split("|")[2:], int(r["key"].split("|")[1]))
        ):
            target, T, impl, remat = r["key"].split("|")
            b = r.get("per_device_bytes", {})
            needs = r.get("error", "").split(": it needs ")[-1].split(";")[0]
            verdict = "yes" if _fits(r) else f"no: {needs}" if needs else "no"
            print(f"| {target} | {T} | {impl} | {remat} | {_gib(b.get('temp'))} | {_gib(b.get('total'))} | "
                  f"{verdict} |")  # fmt: skip
    else:
        print("| target | mesh | argument GiB/device | collectives |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['target']} | {r['mesh']} | {_gib(r['per_device_bytes']['arguments'])} | "
                  f"{r.get('collectives')} |")  # fmt: skip


def _needed_gib(error: str) -> float | None:
    """GiB a program that does not fit needs, as its error says (GPU: "N GiB per device", TPU: "(NG)")."""
    found = re.search(r"needs ([\d.]+) GiB per device", error)
    if found:
        return float(found.group(1))
    found = re.search(r"temporaries \(([\d.]+)([GT])\)", error)
    return None if not found else float(found.group(1)) * (1024 if found.group(2) == "T" else 1)


def _plot_long_context(rows, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list] = {}
    over: dict[str, list] = {}  # what the programs that do not fit would need (from the error)
    for r in rows:
        target, T, impl, remat = r["key"].split("|")
        label = f"{target} {impl} remat={remat}"
        if "per_device_bytes" in r:
            series.setdefault(label, []).append((int(T), r["per_device_bytes"]["temp"] / 2**30))
        elif (need := _needed_gib(r.get("error", ""))) is not None:
            over.setdefault(label, []).append((int(T), need))
    colors = {}
    for label, points in sorted(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        line = ax.plot(xs, ys, marker="o", label=label, linestyle="--" if "xla" in label else "-")
        colors[label] = line[0].get_color()
    for label, points in sorted(over.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.scatter(xs, ys, marker="x", color=colors.get(label, "black"), s=40)
    for target in sorted({label.split()[0] for label in series}):
        memory = aot_targets.parse(target).device_memory_bytes / 2**30
        ax.axhline(memory, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate(f"{target} memory", (1024, memory), fontsize=7, va="bottom")
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (batch 1)", ylabel="temp GiB per device",
           title="gpt2_small train step: compiler's temp memory vs T (x: needed, does not fit)")  # fmt: skip
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv):
    del argv
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, f"{FLAGS.sweep}.jsonl")
    table(path) if FLAGS.table else run(path)


if __name__ == "__main__":
    app.run(main)
