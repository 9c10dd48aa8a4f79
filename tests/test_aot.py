"""Compiled for real TPU and GPU targets on this CPU machine by the real compilers (libtpu, XLA:CUDA).

Lowering (test_fused.py) proves which kernel is called; compiling proves the Mosaic
kernels build, the program fits the chip, and the sharding gives the collectives it should.
Memory is checked against closed forms (parameter count x bytes), not against the code's own output.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxformer_lite.tools import aot, aot_targets
from flaxformer_lite.train import training

HAS_TPU = importlib.util.find_spec("libtpu") is not None
try:
    HAS_GPU = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
except ModuleNotFoundError:
    HAS_GPU = False


def needs_tpu(test):
    """Marked tpu_aot; skipped without libtpu."""
    skip = pytest.mark.skipif(not HAS_TPU, reason="needs the tpu-aot extra (libtpu)")
    return pytest.mark.tpu_aot(skip(test))


def needs_gpu(test):
    """Marked gpu_aot; skipped without the CUDA plugin wheels."""
    skip = pytest.mark.skipif(not HAS_GPU, reason="needs the gpu-aot extra (CUDA wheels)")
    return pytest.mark.gpu_aot(skip(test))


def _config(name="quickstart", **fields):
    """A config file's config with fields set ("model.x" sets a model override)."""
    config = importlib.import_module(f"configs.{name}").get_config()
    for key, value in fields.items():
        if key.startswith("model_"):
            config.model.overrides[key[len("model_") :]] = value
        else:
            config[key] = value
    return config


def _small(**fields):
    """The quickstart model at T=128 (splash needs multiples of 128) in bf16, packed rows."""
    return _config(max_length=128, batch_size=8, model_dtype="bfloat16", **fields)


def _param_count(config) -> int:
    config = config.copy_and_resolve_references()
    config.mesh_data, config.mesh_fsdp = -1, 1
    exp = aot.build(config, jax.devices()[:1])
    abstract = training.abstract_params(exp.model, exp.task, (1, 8), exp.mesh)
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))


def test_target_names():
    assert aot_targets.parse("tpu:v5e:2x2") == aot_targets.Target("tpu:v5e:2x2", "tpu", "v5e", "2x2")
    assert aot_targets.parse("gpu:h100x8").compute_capability == "9.0"
    assert aot_targets.parse("gpu:a100x1").compute_capability == "8.0"
    assert aot_targets.parse("tpu:v5e:2x2").device_memory_bytes == 16 * 2**30
    for bad in ("tpu:v9:2x2", "gpu:h100", "gpu:h100x0", "v5e:2x2", "tpu:v5e"):
        with pytest.raises(aot_targets.TargetError, match="unknown target"):
            aot_targets.parse(bad)


@pytest.mark.parametrize("limit, compiles", [(148, 4), (60, None), (400, None), (3, None)])
def test_find_max_batch_finds_the_largest_fitting_multiple(monkeypatch, limit, compiles):
    """The search against a closed form: 4 devices share the batch, batches up to `limit` fit, and
    the memory line predicts about 150 rows (exact for 148; far off for 60 and 400, which doubling
    and bisection find, never creeping up a row group at a time)."""
    calls = []

    def fake_compile(config, target, devices, function, beam_size):
        calls.append(config.batch_size)
        if config.batch_size > limit:
            raise aot.DoesNotFit("too big")
        args, per_row = 1 << 30, (15 << 30) // 150
        total = args + per_row * config.batch_size
        return {"batch": config.batch_size, "per_device_bytes": {"total": total, "arguments": args}}

    monkeypatch.setattr(aot, "compile_for", fake_compile)
    config = _config(batch_size=32, mesh_data=4)
    target = aot_targets.parse("tpu:v5e:2x2")
    if limit < 4:
        with pytest.raises(aot.DoesNotFit, match="even at batch 4"):
            aot.find_max_batch(config, target, [None] * 4, "train_step")
        return
    result = aot.find_max_batch(config, target, [None] * 4, "train_step")
    best = limit // 4 * 4
    assert result["max_batch"] == best and result["max_batch_failed_at"] == best + 4
    assert result["batch"] == best and all(b % 4 == 0 for b in calls) and calls[0] == 32
    assert len(calls) == compiles if compiles else len(calls) <= 12  # creeping by 4 would take 25+


@pytest.mark.slow  # 30-130 s on 2 cores: the slow tier (CI runs it)
@needs_tpu
def test_train_step_compiles_for_tpu_with_splash():
    target = aot_targets.parse("tpu:v5e:2x2")
    config = _small(mesh_data=4)
    r = aot.compile_for(config, target, aot_targets.devices(target), "train_step")
    cfg_layers = 2 + 2 + 2  # encoder self, decoder self, cross
    assert r["device_kind"] == "TPU v5 lite" and r["devices"] == 4
    assert r["attention_kernels"] == {"tpu_custom_call": 3 * cfg_layers}  # forward, dq, dkv per attention
    n = _param_count(config)
    state = 3 * 4 * n  # params + Adam's two moments, fp32, replicated over the data axis
    batch = 9 * 2 * 4 * 128  # 9 int32 [2, 128] batch features per device (4 devices share 8 rows)
    # On top: the batch, the key, and TPU tile padding of the 1-D biases and scales (under 1%).
    assert state <= r["per_device_bytes"]["arguments"] <= 1.01 * state + batch + 64
    assert r["per_device_bytes"]["aliased"] >= state  # the donated state is updated in place
    assert r["fits"] and r["per_device_bytes"]["temp"] > 0
    # XLA counts the matmuls; the kernels' share comes from flops.py; together near the closed form.
    assert r["flops_per_step"] == pytest.approx(r["model_flops_per_step"], rel=0.1)


@pytest.mark.slow  # 30-130 s on 2 cores: the slow tier (CI runs it)
@needs_tpu
def test_fsdp_shards_state_and_adds_collectives():
    """fsdp=4 over a v5e 2x2: the state per device is about a quarter of data=4's (the MLP biases
    stay whole) and the compiled step all-gathers params and reduce-scatters gradients.

    d_model 512, so that a quarter of it still fills the TPU's 128 lanes: at d_model 128 the
    [vocab, 32] shards are padded to 128 lanes and the state shrinks only 2.15x (measured)."""
    target = aot_targets.parse("tpu:v5e:2x2")
    devices = aot_targets.devices(target)
    wide = dict(model_d_model=512, model_d_ff=1024, model_num_heads=8)
    dp = aot.compile_for(_small(mesh_data=4, **wide), target, devices, "train_step")
    fsdp = aot.compile_for(_small(mesh_data=1, mesh_fsdp=4, **wide), target, devices, "train_step")
    ratio = dp["per_device_bytes"]["arguments"] / fsdp["per_device_bytes"]["arguments"]
    assert 3.5 < ratio <= 4.0
    exp = aot.build(_small(mesh_data=1, mesh_fsdp=4, **wide), devices)
    program = aot.train_program(exp)
    compiled, _ = aot.compile_program(program, exp, target)
    text = compiled.as_text()
    assert "all-gather" in text and "reduce-scatter" in text


@needs_tpu
def test_lm_decode_compiles_for_tpu():
    target = aot_targets.parse("tpu:v5e:2x2")
    config = _config("lm_compare", batch_size=8, max_length=128, mesh_data=4, model_dtype="bfloat16")
    r = aot.compile_for(config, target, aot_targets.devices(target), "decode")
    assert r["function"] == "decode" and r["fits"] and r["per_device_bytes"]["total"] > 0


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "flaxformer_lite.tools.aot", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@needs_tpu
def test_cli_over_hbm_is_one_line_naming_target_bytes_and_fixes():
    """A 3.2B-parameter embedding (fp32 params + Adam: ~38 GiB) cannot fit a 16 GiB v5e chip."""
    proc = _cli(
        "--config=configs/quickstart.py", "--target=tpu:v5e:2x2", "--functions=train_step",
        "--config.vocab_size=400000", "--config.model.overrides.d_model=8192",
        "--config.model.overrides.num_heads=64", "--config.mesh_data=4", "--config.batch_size=4",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train_step at batch 4 x length 64 does not fit tpu:v5e:2x2")
    assert "HBM" in last and "batch_size" in last and "remat_policy" in last and "mesh_fsdp" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # 30-130 s on 2 cores: the slow tier (CI runs it)
@needs_tpu
def test_cli_prints_a_json_line_per_function():
    proc = _cli("--config=configs/quickstart.py", "--target=tpu:v5e:2x2", "--config.mesh_data=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout is JSON lines only
    assert [r["function"] for r in lines] == ["train_step", "decode"]
    for r in lines:
        assert set(r["per_device_bytes"]) >= {"arguments", "outputs", "temp", "aliased", "total"}
        assert r["target"] == "tpu:v5e:2x2" and r["devices"] == 4 and r["compile_seconds"] > 0
    assert "compiler figures, not measured speed" in proc.stderr


def test_cli_unknown_target_is_one_line():
    proc = _cli("--config=configs/quickstart.py", "--target=tpu:v9:2x2")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown target 'tpu:v9:2x2'")


@pytest.mark.slow  # 30-130 s on 2 cores: the slow tier (CI runs it)
@needs_gpu
@pytest.mark.parametrize("gpu, fused", [("h100", True), ("a100", False)])
def test_train_step_compiles_for_gpu_with_cudnn_on_hopper_only(gpu, fused):
    """Packed rows: cuDNN flash attention on an H100 target; an A100 target (pre-Hopper: no packed
    cuDNN layout) takes XLA attention. The capability comes from the target, not this CPU."""
    target = aot_targets.parse(f"gpu:{gpu}x1")
    r = aot.compile_for(_small(), target, aot_targets.devices(target), "train_step")
    assert gpu.upper() in r["device_kind"]
    if fused:
        assert r["attention_kernels"] == {"__cudnn$fmhaSoftmax": 6, "__cudnn$fmhaSoftmaxBackward": 6}
    else:
        assert r["attention_kernels"] == {}
    state = 3 * 4 * _param_count(_small())
    assert state <= r["per_device_bytes"]["arguments"] <= state + 9 * 8 * 4 * 128 + 64
    assert r["xla_flops_per_device"] > 0  # XLA's HLO cost analysis of the compiled CUDA module


@pytest.mark.slow
@needs_tpu
@pytest.mark.parametrize("name", ["wmt_base", "gpt2_small", "llama_small"])
def test_presets_compile_for_v5e_with_fsdp(name):
    """The presets at their own lengths and batches, FSDP over a v5e 2x2: they fit, with splash.

    With scan_layers: one layer body to compile, not 12 (unrolled, the three took 4-7 minutes each
    on 2 busy cores; the unrolled gpt2_small step compiled for v5e:2x2 in the README's table)."""
    target = aot_targets.parse("tpu:v5e:2x2")
    config = _config(name, mesh_data=1, mesh_fsdp=4, model_scan_layers=True)
    r = aot.compile_for(config, target, aot_targets.devices(target), "train_step")
    assert r["fits"] and r["attention_kernels"]["tpu_custom_call"] > 0
    assert r["length"] == config.max_length and r["batch"] == config.batch_size
