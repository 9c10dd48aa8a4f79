"""Device mesh from config sizes and the logical-axis rule table that maps our axis names onto it.

Data parallel, FSDP, context and tensor parallel are only mesh sizes: data=-1 (all devices) is
pure data parallelism; fsdp=N shards params and optimizer state over N devices along "embed";
context=N splits the activations' sequence ("length") N ways, and self-attention runs under
`ops.context_parallel`; tensor=N splits heads, mlp and vocab. The batch is split over data x fsdp.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from optax.transforms import MaskedNode

MESH_AXES = ("data", "fsdp", "context", "tensor")

# The logical axis names: on params (model/), on activations and in the rule table below.
BATCH, LENGTH, EMBED, HEADS, KV_HEADS, KV = "batch", "length", "embed", "heads", "kv_heads", "kv"
MLP, VOCAB, LAYERS, CLASSES, BUCKETS = "mlp", "vocab", "layers", "classes", "relpos_buckets"
AXES = (BATCH, LENGTH, EMBED, HEADS, KV_HEADS, KV, MLP, VOCAB, LAYERS, CLASSES, BUCKETS)

# Logical axis -> mesh axis (or None = replicated). A mesh axis already used by an earlier
# dimension of the same array is skipped, so activations [batch, length, embed] keep embed whole.
# "length" is on activations (and the learned position table): with context=1 nothing is split.
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, "context"),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (KV, None),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (LAYERS, None),
    (CLASSES, None),
    (BUCKETS, None),
)


def mesh_shape(
    num_devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1, context: int = 1
) -> tuple[int, int, int, int]:
    """(data, fsdp, context, tensor), the MESH_AXES order: one -1 ("fill") resolved, and the sizes
    checked to multiply to the device count."""
    names = ("data", "fsdp", "context", "tensor")
    sizes = [data, fsdp, context, tensor]
    given = ", ".join(f"{n}={s}" for n, s in zip(names, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {given}: at most one may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or num_devices % known:
            raise ValueError(
                f"mesh sizes {given} cannot fill {num_devices} devices; "
                "pick sizes whose product divides the device count."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        product = " x ".join(f"{n}={s}" for n, s in zip(names, sizes, strict=True))
        raise ValueError(
            f"mesh {product} = {math.prod(sizes)} devices, "
            f"but {num_devices} are available; set one size to -1 to fill."
        )
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *, context: int = 1) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over `devices` (default: all, across hosts)."""
    if devices is None:  # all devices, laid out by jax for the hardware's interconnect
        shape = mesh_shape(jax.device_count(), data, fsdp, tensor, context)
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    # Given devices (a subset, or a TPU/GPU topology to compile for) are used as given: never
    # replaced by this machine's devices because the counts happen to match.
    shape = mesh_shape(len(devices), data, fsdp, tensor, context)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of `nn.Partitioned` leaves (as from `jax.eval_shape(init)`).

    The result has the *unboxed* structure, matching `nn.unbox(tree)`.
    """
    # A frozen parameter's optimizer state (optax.masked, freeze_body) is a MaskedNode, boxed by init
    # like the parameter: unboxed it is a leafless node, which must get no sharding either.
    tree = jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) and isinstance(x.value, MaskedNode) else x,
        abstract_boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, rules)


def under_rules(fn, rules=DEFAULT_RULES):
    """`fn`, traced under the logical axis rules: without them the models' activation constraints
    (`nn.with_logical_constraint`) are silently no-ops and XLA picks the activations' shardings.
    Every jit of a model function goes through it: train, eval and decode steps alike."""

    @functools.wraps(fn)  # keeps the signature: jax.jit's static_argnames are looked up in it
    def wrapped(*args, **kwargs):
        with nn.logical_axis_rules(rules):
            return fn(*args, **kwargs)

    return wrapped


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their first axis over data x fsdp and replicated over tensor."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble each host's slice of the batch into global arrays (one host: a sharded put)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
