"""Real TPU and GPU targets to compile for from a CPU-only machine (deviceless ahead-of-time).

`devices("tpu:v5e:2x2")` gives the devices of that topology as libtpu's compiler sees them;
`devices("gpu:h100x8")` gives 8 deviceless H100s for XLA's CUDA compiler. Nothing runs on them:
a Mesh over them serves `jax.jit(...).lower(...).compile()`. Needs the `tpu-aot` extra (libtpu) or
the `gpu-aot` extra (the CUDA plugin wheels) and `JAX_PLATFORMS=cpu`.

Device facts are the vendors' published figures (TPU HBM per chip; GPU SM count, shared memory,
memory, clock, bandwidth, compute capability), written once here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

from flaxformer_lite import files

GIB = 1 << 30

# HBM per JAX device (Google Cloud TPU docs: v4 32 GiB, v5e 16, v5p 95, v6e 32 per chip; a TPU7x chip
# has 192 GiB and shows as two devices).
TPU_HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB, "tpu7x": 96 * GIB}

# GpuTargetConfigProto fields per GPU (NVIDIA data sheets / cudaGetDeviceProperties of that part).
_GPUS = {
    "h100": dict(
        name="NVIDIA H100 80GB HBM3", sms=132, cc=(9, 0), smem_optin=232448, smem_core=233472,
        fpus=128, l2=52428800, ghz=1.98, bandwidth=3352320000000, memory=84942979072,
    ),
    "h200": dict(  # same GH100 die as the H100 SXM; 141 GB HBM3e at 4.8 TB/s
        name="NVIDIA H200", sms=132, cc=(9, 0), smem_optin=232448, smem_core=233472,
        fpus=128, l2=52428800, ghz=1.98, bandwidth=4800000000000, memory=150754820096,
    ),
    "a100": dict(  # A100 SXM 80GB
        name="NVIDIA A100-SXM4-80GB", sms=108, cc=(8, 0), smem_optin=166912, smem_core=167936,
        fpus=64, l2=41943040, ghz=1.41, bandwidth=2039000000000, memory=85899345920,
    ),
}  # fmt: skip


def _cuda_versions() -> tuple[tuple[int, int], tuple[int, int]]:
    """(cuDNN, CUDA runtime) (major, minor) of the installed CUDA wheels: what a run would load."""
    try:
        from jax._src.lib import cuda_versions

        dnn, runtime = cuda_versions.cudnn_get_version(), cuda_versions.cuda_runtime_get_version()
        return (dnn // 10000, dnn // 100 % 100), (runtime // 1000, runtime // 10 % 100)
    except Exception:  # no CUDA wheels: the figures of jax[cuda12]==0.10.2's oldest supported pair
        return (9, 8), (12, 8)


class TargetError(ValueError):
    """A target name we cannot compile for (unknown, or its compiler is not installed)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed target name: "tpu:<topology>" or "gpu:<model>x<count>"."""

    name: str
    platform: str  # "tpu" | "gpu"
    chip: str  # v5e, v6e, ... | h100, h200, a100
    topology: str  # TPU topology ("2x2", "2x2x1") | GPU count as a string

    @property
    def device_memory_bytes(self) -> int:
        if self.platform == "tpu":
            return TPU_HBM_BYTES[self.chip]
        return _GPUS[self.chip]["memory"]

    @property
    def usable_memory_bytes(self) -> int:
        """What a program may use: a TPU's HBM (the compiler itself refuses more), a GPU's memory times
        the fraction JAX preallocates for its pool (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)."""
        if self.platform == "tpu":
            return self.device_memory_bytes
        return int(self.device_memory_bytes * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")))

    @property
    def compute_capability(self) -> str | None:
        """ "9.0" for Hopper GPUs; None for TPUs."""
        return ".".join(map(str, _GPUS[self.chip]["cc"])) if self.platform == "gpu" else None


def parse(name: str) -> Target:
    """ "tpu:v5e:2x2" / "gpu:h100x8" -> Target; a one-line error listing what is known otherwise."""
    tpu = re.fullmatch(r"tpu:([a-z0-9]+):(\d+(?:x\d+){1,2})", name)
    if tpu and tpu.group(1) in TPU_HBM_BYTES:
        return Target(name, "tpu", tpu.group(1), tpu.group(2))
    gpu = re.fullmatch(r"gpu:([a-z0-9]+)x(\d+)", name)
    if gpu and gpu.group(1) in _GPUS and int(gpu.group(2)) > 0:
        return Target(name, "gpu", gpu.group(1), gpu.group(2))
    raise TargetError(
        f"unknown target {name!r}; use tpu:<chip>:<topology> with chip in {sorted(TPU_HBM_BYTES)} "
        f"(e.g. tpu:v5e:2x2, tpu:v5p:2x2x1) or gpu:<model>x<count> with model in {sorted(_GPUS)} "
        "(e.g. gpu:h100x8)."
    )


def gpu_target_config(chip: str) -> str:
    """The GpuTargetConfigProto (text form) that XLA's CUDA compiler reads instead of a device."""
    g = _GPUS[chip]
    dnn, runtime = _cuda_versions()
    return (
        "gpu_device_info { "
        f"core_count: {g['sms']} threads_per_block_limit: 1024 threads_per_warp: 32 "
        f"shared_memory_per_block: 49152 shared_memory_per_block_optin: {g['smem_optin']} "
        f"shared_memory_per_core: {g['smem_core']} threads_per_core_limit: 2048 "
        f"fpus_per_core: {g['fpus']} registers_per_core_limit: 65536 registers_per_block_limit: 65536 "
        "block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
        f"memory_bandwidth: {g['bandwidth']} l2_cache_size: {g['l2']} clock_rate_ghz: {g['ghz']} "
        f"device_memory_size: {g['memory']} "
        f"cuda_compute_capability {{ major: {g['cc'][0]} minor: {g['cc'][1]} }} }} "
        f'platform_name: "CUDA" dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} }} '
        f"runtime_version {{ major: {runtime[0]} minor: {runtime[1]} }} "
        f'device_description_str: "{g["name"]}"'
    )


def _plugin_installed(platform: str) -> bool:
    name = "libtpu" if platform == "tpu" else "jax_plugins.xla_cuda12"
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def devices(target: Target) -> list:
    """The target's devices (compile-only: nothing can run on them)."""
    from jax.experimental import topologies

    extra = "tpu-aot" if target.platform == "tpu" else "gpu-aot"
    if not _plugin_installed(target.platform):
        raise TargetError(
            f"compiling for {target.name} needs the {target.platform.upper()} compiler: "
            f"pip install -c constraints.txt -e '.[{extra}]', then run with JAX_PLATFORMS=cpu."
        )
    if target.platform == "tpu":
        # No TPU VM metadata to query here (say so, instead of libtpu's warnings), and no chips to
        # share: several compiling processes may load libtpu at once (its lockfile fails the second).
        for name, value in (
            ("TPU_SKIP_MDS_QUERY", "1"),
            ("TPU_WORKER_HOSTNAMES", "localhost"),
            ("TPU_WORKER_ID", "0"),
            ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
        ):
            os.environ.setdefault(name, value)
    try:
        if target.platform == "tpu":
            dims = [int(d) for d in target.topology.split("x")]
            host = tuple(min(d, b) for d, b in zip(dims + [1], (2, 2, 1), strict=False))  # chips per host
            topo = topologies.get_topology_desc(
                platform="tpu", topology_name=f"{target.chip}:{target.topology}", chips_per_host_bounds=host
            )
        else:
            topo = topologies.get_topology_desc(
                platform="cuda",
                target_config=gpu_target_config(target.chip),
                topology=f"1x1x{target.topology}",
            )
    except Exception as e:  # the compiler rejects the topology (or JAX_PLATFORMS is not cpu)
        first = files.reason(e)
        raise TargetError(
            f"cannot make the devices of {target.name}: {first}. Check the topology (e.g. tpu:v5e:2x2, "
            "tpu:v5p:2x2x1) and run with JAX_PLATFORMS=cpu."
        ) from e
    return list(topo.devices)
