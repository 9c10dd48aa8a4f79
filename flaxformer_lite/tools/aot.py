"""Compile the train and decode steps for a real TPU or GPU from a CPU-only machine (ahead of time).

    JAX_PLATFORMS=cpu python -m flaxformer_lite.tools.aot --config=configs/gpt2_small.py --target=tpu:v5e:2x2
    JAX_PLATFORMS=cpu python -m flaxformer_lite.tools.aot --config=configs/wmt_base.py --target=gpu:h100x8 \
        --config.mesh_data=1 --config.mesh_fsdp=8 --find_max_batch

The same `Experiment` and jitted train step as train.py, over the config's mesh (mesh_data/fsdp/
tensor) of the target's devices (`aot_targets.py`), and the decode step: eval.py's beam search for
translation, generate.py's sampling for LMs. Prints one JSON line per compiled function (memory per
device from the compiler's own analysis, whether it fits, the attention kernels in the compiled
module, FLOPs, compile time) and a one-line summary. Compiler figures, not measured speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from flaxformer_lite import cli, sharding, tasks
from flaxformer_lite.model import flops
from flaxformer_lite.tools import aot_targets
from flaxformer_lite.train import experiment, training

# Custom calls that are fused attention: TPU Mosaic kernels (splash) and cuDNN flash attention.
ATTENTION_CALLS = re.compile(r"tpu_custom_call|__cudnn\$fmha\w*")


class DoesNotFit(ValueError):
    """The program needs more memory per device than the target has."""


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function with abstract (sharded) arguments, ready to lower and compile."""

    name: str  # "train_step" | "decode"
    jitted: Callable
    args: tuple
    batch: int
    length: int
    fused_attention_flops: int  # per step, inside fused kernels (our formula: XLA cannot see them)


def _rng(mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))


def _attention_flops(exp, length: int) -> int:
    """Forward attention-score FLOPs of one sequence (pair) at `length`, for this experiment's model."""
    cfg, task = exp.model.config, exp.task
    encoder_only = task.model_class.__name__ == "EncoderOnly"
    return flops.attention_flops(cfg, length, length if task.paired else 0, encoder_only=encoder_only)


def train_program(exp) -> Program:
    """train.py's jitted train step (state donated), on abstract sharded state and batch."""
    B, T = exp.batch_shape
    state, shardings = exp.abstract_state()
    rows = sharding.batch_sharding(exp.mesh)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rows) for k in exp.task.example_batch(1, 1)}
    fused = 3 * B * _attention_flops(exp, T)
    return Program("train_step", exp.train_step(shardings), (state, batch, _rng(exp.mesh)), B, T, fused)


def decode_program(exp, beam_size: int = 4) -> Program | None:
    """Beam search over a [B, max_length] source batch (translation), or sampling of
    max_decode_length tokens after a prompt that fills the rest of max_length (LMs); None for MLM."""
    c, model = exp.config, exp.inference_model
    B, T = exp.batch_shape
    params = training.abstract_params(model, exp.task, exp.batch_shape, exp.mesh)
    rows = sharding.batch_sharding(exp.mesh)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    if exp.task.translates:
        fn = tasks.translate_fn(model, beam_size=beam_size, alpha=0.6, max_decode_length=c.max_decode_length)
        args, in_shardings = (
            (params, jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rows)),
            (param_shardings, rows),
        )
        cfg = model.config
        fused = B * T * cfg.num_encoder_layers * flops._scores(cfg, T)  # the encoder's self-attention
    elif exp.task.name == "lm":
        new = min(c.max_decode_length, T // 2)
        fn = tasks.continue_fn(model, max_new_tokens=new, temperature=1.0)
        prompt = jax.ShapeDtypeStruct((B, T - new), jnp.int32, sharding=rows)
        args, in_shardings = (params, prompt, _rng(exp.mesh)), (param_shardings, rows, None)
        fused = 0  # prefill with a cache mask takes the XLA path
    else:
        return None
    jitted = jax.jit(sharding.under_rules(fn), in_shardings=in_shardings, out_shardings=rows)
    return Program("decode", jitted, args, B, T, fused)


@contextlib.contextmanager
def _target_gpu(target: aot_targets.Target):
    """jax's cuDNN capability checks answer for the target GPU, not for this machine's CPU.

    jax asks the *default* backend (here the CPU) whether the GPU is a Hopper; while compiling for a
    deviceless GPU the answer must come from the target's compute capability. Only here, never in
    the library's own code paths, where it would hide a real check.
    """
    if target.platform != "gpu":
        yield
        return
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    have = tuple(int(x) for x in target.compute_capability.split("."))
    at_least = lambda capability: have >= tuple(int(x) for x in capability.split("."))  # noqa: E731
    equal = lambda capability: have == tuple(int(x) for x in capability.split("."))  # noqa: E731
    with (
        mock.patch.object(cudnn, "check_compute_capability", at_least),
        mock.patch.object(cudnn, "is_cuda_compute_capability_equal", equal),
    ):
        yield


# The TPU compiler's two ways of saying how much HBM a program needs and how much there is.
_HBM_OOM = (
    re.compile(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm"),
    re.compile(r"required for [^(]*\(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)"),
)


def compile_program(program: Program, exp, target: aot_targets.Target):
    """(compiled, seconds). A program over the device memory raises DoesNotFit (one line)."""
    start = time.perf_counter()
    try:
        with jax.set_mesh(exp.mesh):
            compiled = program.jitted.lower(*program.args).compile()
    except Exception as e:  # the TPU compiler's own out-of-memory verdict
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        used = next((m for m in (p.search(str(e)) for p in _HBM_OOM) if m), None)
        need = f"{used.group(1)}B of {used.group(2)}B" if used else cli.one_line(e)[:200]
        raise DoesNotFit(_advice(program, target, f"needs {need} HBM per chip (the TPU compiler)")) from e
    return compiled, time.perf_counter() - start


def _advice(program: Program, target: aot_targets.Target, need: str) -> str:
    return (
        f"{program.name} at batch {program.batch} x length {program.length} does not fit {target.name}: "
        f"it {need}; lower --config.batch_size, set --config.model.overrides.remat_policy=full (or dots), "
        "or shard params and optimizer state with --config.mesh_fsdp."
    )


def memory(compiled) -> dict:
    """Bytes per device from the compiler: arguments, outputs, temp, aliased and their total."""
    m = compiled.memory_analysis()
    sizes = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
    }
    sizes["total"] = sizes["arguments"] + sizes["outputs"] + sizes["temp"] - sizes["aliased"]
    return sizes


def xla_flops(compiled) -> float | None:
    """XLA's FLOP count per device of the compiled module (fused custom calls not included).

    The GPU client does not implement `cost_analysis()`; there XLA's HLO cost analysis of the
    compiled module runs through a private API (None if it moves).
    """
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])
    except Exception:
        pass
    try:
        from jax._src import xla_bridge
        from jax._src.lib import xla_client

        module = compiled.runtime_executable().hlo_modules()[0]
        cost = xla_client._xla.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
        return float(cost["flops"])
    except Exception:
        return None


def custom_calls(compiled) -> dict[str, int]:
    """Custom-call targets in the compiled module and how often each appears."""
    text = compiled.as_text()
    return dict(Counter(re.findall(r'custom_call_target="([^"]+)"', text)))


_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def collectives(compiled) -> dict[str, int]:
    """How many of each cross-device collective the compiled module holds (async starts included)."""
    text = compiled.as_text()
    counts = {name: len(re.findall(rf"[ )]{name}(?:-start)?\(", text)) for name in _COLLECTIVES}
    return {name: n for name, n in counts.items() if n}


def analyse(program: Program, exp, target: aot_targets.Target) -> dict:
    """Compile `program` for `target` and report what the compiler says about it."""
    compiled, seconds = compile_program(program, exp, target)
    sizes, calls = memory(compiled), custom_calls(compiled)
    kernels = {name: n for name, n in calls.items() if ATTENTION_CALLS.fullmatch(name)}
    devices = exp.mesh.devices.size
    per_device = xla_flops(compiled)
    fused = program.fused_attention_flops if kernels else 0
    return {
        "target": target.name,
        "device_kind": exp.mesh.devices.flat[0].device_kind,
        "devices": devices,
        "mesh": dict(exp.mesh.shape),
        "config": exp.config.model.preset,
        "function": program.name,
        "batch": program.batch,
        "length": program.length,
        "per_device_bytes": sizes,
        "device_memory_bytes": target.device_memory_bytes,
        "usable_memory_bytes": target.usable_memory_bytes,
        "fits": sizes["total"] <= target.usable_memory_bytes,
        "attention_kernels": kernels,
        "custom_calls": calls,
        "collectives": collectives(compiled),
        "xla_flops_per_device": per_device,
        "fused_attention_flops": fused,
        # XLA counts a while loop's body once: with scan_layers its count misses all layers but one
        "flops_per_step": None
        if per_device is None or exp.model.config.scan_layers
        else per_device * devices + fused,
        "model_flops_per_step": _model_flops(exp, program),
        "compile_seconds": round(seconds, 1),
        "jax": jax.__version__,
    }


def _model_flops(exp, program: Program) -> int | None:
    """flops.py's closed form for the train step (useful FLOPs: 3x forward); None for decoding."""
    if program.name != "train_step":
        return None
    cfg, T = exp.model.config, program.length
    if exp.task.model_class.__name__ == "EncoderOnly":
        return 3 * program.batch * flops.encoder_forward_flops(cfg, T)
    return program.batch * flops.train_flops(cfg, T, T if exp.task.paired else 0)


def build(config, devices) -> experiment.Experiment:
    """The experiment of `config` over `devices`, with the config's vocabulary size (no tokenizer)."""
    return experiment.build(config, None, tokenizer="none", vocab_size=config.vocab_size, devices=devices)


def program_for(exp, function: str, beam_size: int = 4) -> Program | None:
    if function == "train_step":
        return train_program(exp)
    if function == "decode":
        return decode_program(exp, beam_size)
    raise ValueError(f"unknown function {function!r}; use train_step or decode.")


def compile_for(
    config, target: aot_targets.Target, devices, function: str, beam_size: int = 4
) -> dict | None:
    """The report of `function` compiled at the config's batch; DoesNotFit if it needs too much memory."""
    with _target_gpu(target):  # also while the abstract state is traced: attention paths are chosen there
        exp = build(config, devices)
        program = program_for(exp, function, beam_size)
        if program is None:
            return None
        result = analyse(program, exp, target)
    if not result["fits"]:  # the GPU compiler has no out-of-memory verdict: compare with the device
        total, have = result["per_device_bytes"]["total"], result["usable_memory_bytes"]
        whole = target.device_memory_bytes / 2**30
        usable = f"{have / 2**30:.2f} usable (XLA_PYTHON_CLIENT_MEM_FRACTION of {whole:.2f})"
        raise DoesNotFit(_advice(program, target, f"needs {total / 2**30:.2f} GiB per device of {usable}"))
    return result


def find_max_batch(config, target: aot_targets.Target, devices, function: str, beam_size: int = 4) -> dict:
    """The report at the largest global batch that fits (a multiple of the devices that share a
    batch, times grad_accum_steps), searched by compiles.

    Doubling finds a batch that does not fit, bisection closes in. Twice, when a compile first fits
    and when the bracket first closes, the probe is instead the batch at which a straight line
    through the largest fitting compile's memory (arguments fixed, the rest per row) reaches the
    device's memory: memory is close to linear in the batch, so this often settles it in 3-4
    compiles (the config's batch, the prediction, one more that fails).
    """
    mesh = sharding.mesh_shape(
        len(devices), config.mesh_data, config.mesh_fsdp, config.mesh_tensor, config.mesh_context
    )
    step = mesh[0] * mesh[1] * config.grad_accum_steps

    def attempt(batch: int) -> dict | None:
        trial = config.copy_and_resolve_references()
        trial.batch_size = batch
        try:
            return compile_for(trial, target, devices, function, beam_size)
        except DoesNotFit:
            return None

    best, low, high, predictions = None, 0, None, set()
    batch = max(step, config.batch_size // step * step)
    while batch <= _MAX_BATCH:
        result = attempt(batch)
        best, low = (result, batch) if result else (best, low)
        high = high if result else batch
        if high is not None and high - low <= step:
            break
        phase = "grow" if high is None else "bracket"
        if best is not None and phase not in predictions:  # once per phase: the line's guess
            predictions.add(phase)
            guess = _predict(best, target)
        else:
            guess = 2 * low if high is None else (low + high) // 2
        batch = max(guess // step * step, low + step)
        batch = batch if high is None else min(batch, high - step)
    if best is None:
        raise DoesNotFit(f"{function} does not fit {target.name} even at batch {step}; {_FIXES}")
    return {**best, "max_batch": low, "max_batch_failed_at": high}


_MAX_BATCH = 1 << 20
_FIXES = (
    "set --config.model.overrides.remat_policy=full (or dots), shard params and optimizer state with "
    "--config.mesh_fsdp, or shorten --config.max_length."
)


def _predict(result: dict, target: aot_targets.Target) -> int:
    """The batch at which per-device memory reaches the device's, on a line through (0, arguments)
    and (batch, total) of a compile that fit."""
    sizes, batch = result["per_device_bytes"], result["batch"]
    per_row = max(sizes["total"] - sizes["arguments"], 1) / batch
    return int((target.device_memory_bytes - sizes["arguments"]) / per_row)


def summary(r: dict) -> str:
    """One line for people: memory, fit, kernels, FLOPs, compile time (labelled compiler figures)."""
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    kernels = ", ".join(f"{k} x{n}" for k, n in r["attention_kernels"].items()) or "none (XLA attention)"
    flops_text = f"{r['flops_per_step']:.3g} FLOPs/step" if r["flops_per_step"] else "FLOPs unknown"
    largest = f", largest batch that fits {r['max_batch']}" if "max_batch" in r else ""
    return (
        f"{r['function']} of {r['config']} on {r['target']} ({r['devices']} x {r['device_kind']}, mesh "
        f"{r['mesh']}): batch {r['batch']} x {r['length']} needs {gib(r['per_device_bytes']['total'])} of "
        f"{gib(r['usable_memory_bytes'])} usable per device ({'fits' if r['fits'] else 'no fit'}){largest}; "
        f"attention kernels: {kernels}; {flops_text}; compiled in {r['compile_seconds']} s "
        "(compiler figures, not measured speed)"
    )


# ------------------------------------------------------------------------------ command line


def define_flags() -> None:
    """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=False)
    flags.DEFINE_string(
        "target", None, "tpu:<chip>:<topology> (tpu:v5e:2x2) or gpu:<model>x<n> (gpu:h100x8)."
    )
    flags.DEFINE_list("functions", ["train_step", "decode"], "What to compile: train_step, decode.")
    flags.DEFINE_bool("find_max_batch", False, "Search the largest global batch that fits (many compiles).")
    flags.DEFINE_integer("beam_size", 4, "Beam size of the translation decode step.")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if "JAX_PLATFORMS" not in os.environ:  # the host backend stays the CPU; the target is compile-only
        jax.config.update("jax_platforms", "cpu")
    try:
        if FLAGS.target is None:
            raise ValueError("--target is required, e.g. --target=tpu:v5e:2x2 or --target=gpu:h100x1")
        target = aot_targets.parse(FLAGS.target)
        devices = aot_targets.devices(target)
        for function in FLAGS.functions:
            search = find_max_batch if FLAGS.find_max_batch else compile_for
            result = search(FLAGS.config, target, devices, function, FLAGS.beam_size)
            if result is None:
                continue  # no decode step for this task (MLM)
            print(json.dumps(result), flush=True)
            print(summary(result), file=sys.stderr, flush=True)
    except cli.USER_ERRORS as e:
        cli.exit_with_error(e)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
