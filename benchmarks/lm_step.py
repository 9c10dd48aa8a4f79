"""Our decoder-only LM train step against nanoGPT's, alternating calls in one process (issue 32).

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt     # the anchor; never copied in here
    JAX_PLATFORMS=cpu python -m benchmarks.lm_step --nanogpt_dir=/tmp/nanogpt
    JAX_PLATFORMS=cpu python -m benchmarks.lm_step --nanogpt_dir=/tmp/nanogpt --profile=/tmp/lm_prof

Shapes: `configs/lm_compare.py` (d 192, 4 layers, 6 heads, d_ff 768, vocab 4000, batch 32 x 128,
fp32, no dropout). Sides:
- "nanogpt": nanoGPT's own `model.py` (GPT, bias, no dropout) and its `configure_optimizers` AdamW
  (decay 0.1 on 2-D params), stepped as its train.py steps at fp32 without torch.compile:
  forward with targets, backward, clip_grad_norm_(1.0), optimizer.step, zero_grad(set_to_none).
- "ours": the train step of `configs/lm_compare.py` (experiment.build, as train.py jits it), on
  full rows of random tokens in our pipeline format (segment ids, positions).
- "plain_jax" (with --plain_jax): a minimal JAX GPT of the same dims written here (fused QKV,
  `jax.nn.dot_product_attention(is_causal=True)`, optax adamw + clipping, donated buffers): what
  plain JAX reaches, with none of our model code.

Calls alternate nanogpt, ours[, plain_jax], nanogpt, ...; per side the median ms per step; the
ratio ours/nanoGPT is the median over adjacent call pairs of nanoGPT's time / ours (> 1 = ours
faster). --profile traces `--profile_steps` steps per side: XLA ops from jax.profiler (thread ms per
step by `hlo_op`), torch ops from torch.profiler (self CPU ms per step), and prints the top ops.
--b_patch / --b_option add a side "ours_b" (one lever switched by a module attribute at trace time,
or XLA compiler options) for an A/B of one lever in one process.

The ratio against nanoGPT depends on the machine's load, not only on the code: with more runnable
threads than cores, torch's two OpenMP threads slow down far more than XLA's (measured 2026-11-30 on
the 2-core VM: ours 0.73x nanoGPT's speed at load average 1.2-1.6, 1.7x at 5.6, 2.4x at 11).
Quote it with the load average the JSON line records, from a quiet machine.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import functools
import importlib
import importlib.util
import itertools
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks.common import load_config, report, synthetic_batch, xla_op_profile
from flaxformer_lite import sharding
from flaxformer_lite.train import experiment

flags.DEFINE_string(
    "nanogpt_dir", os.environ.get("NANOGPT_DIR"), "A checkout of github.com/karpathy/nanoGPT."
)
flags.DEFINE_string("config", "configs/lm_compare.py", "Our experiment config (model dims, optimizer).")
flags.DEFINE_integer("batch", 32, "Rows per step.")
flags.DEFINE_integer("length", 128, "Tokens per row.")
flags.DEFINE_integer("vocab", 4000, "Vocabulary size.")
flags.DEFINE_integer("iters", 20, "Timed calls per side (alternating).")
flags.DEFINE_integer("warmup", 3, "Untimed calls per side after compiling.")
flags.DEFINE_bool("plain_jax", False, "Also time a minimal plain-JAX GPT of the same dims.")
flags.DEFINE_bool("nanogpt", True, "Time nanoGPT (needs torch and --nanogpt_dir).")
flags.DEFINE_multi_string("set", [], "Overrides of our model fields, e.g. --set=scan_layers=True.")
flags.DEFINE_multi_string(
    "config_set", [], "Overrides of our experiment config, e.g. --config_set=clip_norm=0."
)
flags.DEFINE_multi_string(
    "b_patch",
    [],
    "A second side of ours, 'ours_b', traced with module attributes set: module:attr=value, e.g. "
    "--b_patch=flaxformer_lite.ops.logits:TRANSPOSED_GRAD_BACKENDS=() (an A/B of one lever, one process).",
)
flags.DEFINE_multi_string(
    "b_option",
    [],
    "XLA compiler options of 'ours_b' (name=value), e.g. --b_option=xla_cpu_prefer_vector_width=512.",
)
flags.DEFINE_string("profile", "", "Folder for per-side traces; print the top ops per side, then stop.")
flags.DEFINE_integer("profile_steps", 5, "Steps traced per side with --profile.")
flags.DEFINE_integer("top", 25, "Ops listed per side with --profile.")
FLAGS = flags.FLAGS


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"True": True, "False": False, "true": True, "false": False, "None": None}.get(value, value)


# ------------------------------------------------------------------------------ sides


@contextlib.contextmanager
def patched(patches: list[str]):
    """Module attributes set from "module:attr=value" (value a Python literal) inside the block."""
    saved = []
    try:
        for item in patches:
            target, value = item.split("=", 1)
            module, attr = target.split(":")
            module = importlib.import_module(module)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, ast.literal_eval(value))
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def our_step(patches: tuple[str, ...] = (), options: tuple[str, ...] = ()):
    """A thunk running one of our train steps (state carried between calls), traced with `patches`
    (see `patched`) and compiled with XLA `options` ("name=value")."""
    config = load_config(FLAGS.config)
    config.batch_size, config.max_length = FLAGS.batch, FLAGS.length
    config.mesh_data = 1
    for item in FLAGS.config_set:
        key, value = item.split("=", 1)
        config[key] = _parse(value)
    for item in FLAGS.set:
        key, value = item.split("=", 1)
        config.model.overrides[key] = _parse(value)
    exp = experiment.build(config, None, tokenizer="none", vocab_size=FLAGS.vocab)
    state, shardings = exp.init_state(jax.random.key(0))
    step = exp.train_step(shardings)
    with jax.set_mesh(exp.mesh):
        batch = sharding.global_batch(
            synthetic_batch(exp.task, FLAGS.batch, FLAGS.length, FLAGS.vocab), exp.mesh
        )
    holder = [state]
    rng = jax.random.key(1)
    with jax.set_mesh(exp.mesh), patched(list(patches)):
        opts = {k: _parse(v) for k, v in (o.split("=", 1) for o in options)}
        compiled = step.lower(state, batch, rng).compile(opts or None)

    def run():
        with jax.set_mesh(exp.mesh):
            holder[0], metrics = compiled(holder[0], batch, rng)
        return jax.block_until_ready(metrics["loss"])

    run.compiled = lambda: compiled
    run.params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
    return run


def plain_jax_step():
    """A minimal GPT in plain JAX at our config's dims (pre-LN, tied, learned positions, GELU-tanh)."""
    m = load_config(FLAGS.config).model.overrides
    d, layers, heads, ff = m.d_model, m.num_decoder_layers, m.num_heads, m.d_ff
    B, T, V = FLAGS.batch, FLAGS.length, FLAGS.vocab
    keys = iter(jax.random.split(jax.random.key(0), 4 + 4 * layers))
    normal = lambda shape: 0.02 * jax.random.normal(next(keys), shape)  # noqa: E731
    ln = lambda: {"g": jnp.ones(d), "b": jnp.zeros(d)}  # noqa: E731
    params = {
        "wte": normal((V, d)), "wpe": normal((T, d)), "ln_f": ln(),
        "blocks": [
            {"ln1": ln(), "ln2": ln(), "qkv": normal((d, 3 * d)), "qkv_b": jnp.zeros(3 * d),
             "proj": normal((d, d)), "proj_b": jnp.zeros(d), "fc": normal((d, ff)), "fc_b": jnp.zeros(ff),
             "out": normal((ff, d)), "out_b": jnp.zeros(d)}
            for _ in range(layers)
        ],
    }  # fmt: skip

    def layer_norm(x, p):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]

    def loss_fn(p, x, y):
        h = p["wte"][x] + p["wpe"][None, :T]  # [B, T, d]
        for blk in p["blocks"]:
            qkv = layer_norm(h, blk["ln1"]) @ blk["qkv"] + blk["qkv_b"]  # [B, T, 3d]
            q, k, v = jnp.split(qkv.reshape(B, T, 3, heads, d // heads), 3, axis=2)  # [B, T, 1, N, H] each
            a = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], is_causal=True)
            h = h + a.reshape(B, T, d) @ blk["proj"] + blk["proj_b"]
            u = jax.nn.gelu(layer_norm(h, blk["ln2"]) @ blk["fc"] + blk["fc_b"], approximate=True)
            h = h + u @ blk["out"] + blk["out_b"]
        logits = layer_norm(h, p["ln_f"]) @ p["wte"].T  # [B, T, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    decay = lambda p: jax.tree.map(lambda w: w.ndim >= 2, p)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-3, 0.9, 0.99, 1e-8, weight_decay=0.1, mask=decay)
    )

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(3, V, (B, T)), jnp.int32)
    y = jnp.asarray(rng.integers(3, V, (B, T)), jnp.int32)
    state = [params, tx.init(params)]

    def run():
        state[0], state[1], loss = step(state[0], state[1], x, y)
        return jax.block_until_ready(loss)

    run.compiled = lambda: step.lower(state[0], state[1], x, y).compile()
    return run


def nanogpt_step():
    """nanoGPT's model.py and AdamW, one train.py iteration per call (fp32, no compile, no dropout)."""
    import torch

    path = os.path.join(FLAGS.nanogpt_dir or "", "model.py")
    if not os.path.isfile(path):
        raise SystemExit(
            f"--nanogpt_dir={FLAGS.nanogpt_dir!r} holds no model.py; get the anchor with "
            "`git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt` and pass "
            "--nanogpt_dir=/tmp/nanogpt."
        )
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    nano = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nano)
    m = load_config(FLAGS.config).model.overrides
    torch.manual_seed(0)
    cfg = nano.GPTConfig(
        block_size=FLAGS.length, vocab_size=FLAGS.vocab, n_layer=m.num_decoder_layers, n_head=m.num_heads,
        n_embd=m.d_model, dropout=0.0, bias=True,
    )  # fmt: skip
    model = nano.GPT(cfg)
    model.train()
    opt = model.configure_optimizers(
        weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.99), device_type="cpu"
    )
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(3, FLAGS.vocab, (FLAGS.batch, FLAGS.length)))
    y = torch.from_numpy(rng.integers(3, FLAGS.vocab, (FLAGS.batch, FLAGS.length)))

    def run():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    run.torch = torch
    return run


# ------------------------------------------------------------------------------ profiles


def torch_op_profile(run, folder: str, steps: int) -> collections.Counter:
    """Self CPU ms per step by aten op from torch.profiler (its Chrome trace kept in `folder`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    os.makedirs(folder, exist_ok=True)
    prof.export_chrome_trace(os.path.join(folder, "trace.json"))
    per_op = collections.Counter()
    for event in prof.key_averages():
        per_op[event.key] += event.self_cpu_time_total / 1e3 / steps
    return per_op


def op_kind(op: str) -> str:
    """A coarse class of an XLA or aten op name, for per-kind totals."""
    for kind, pattern in (
        ("matmul", r"dot|ynn|gemm|convolution|mm|linear|matmul"),
        ("reduce", r"reduce|sum|softmax|norm"),
        ("copy/transpose", r"copy|transpose|slice|concatenate|pad|clone"),
        ("fusion (elementwise)", r"fusion"),
    ):  # fmt: skip
        if re.search(pattern, op):
            return kind
    return "other"


# Parts of our step by the op_name metadata XLA keeps on each compiled op (first match wins).
OUR_PARTS = (
    ("LM head + loss", r"attend|token_losses|/jvp\(\)/|/transpose\(jvp\(\)\)/"),
    ("attention projections", r"self_attention/(query|key|value|out)/"),
    ("attention core", r"self_attention"),
    ("MLP", r"/mlp/"),
    ("LayerNorm", r"norm"),
    ("embeddings, residuals", r"jvp\("),
    ("optimizer, clipping, metrics", r""),
)
# nanoGPT's aten ops by part (self CPU time; its optimizer runs per parameter, not foreach, on CPU).
TORCH_PARTS = (
    ("matmuls (mm, addmm)", r"aten::(mm|addmm|bmm|matmul)$"),
    ("attention core (flash SDPA)", r"scaled_dot_product|flash"),
    ("LM head loss", r"log_softmax|nll_loss|cross_entropy"),
    ("LayerNorm", r"layer_norm"),
    ("GELU", r"gelu"),
    (
        "optimizer, clipping, zero_grad",
        r"mul_|add_|lerp_|addcdiv_|addcmul_|sqrt|div|fill_|norm|stack|clamp|foreach|Optimizer|zero_",
    ),
)


def parts(per_op: collections.Counter, table, names: dict) -> dict:
    out = collections.Counter()
    for op, ms in per_op.items():
        key = names.get(op, op)
        out[next((part for part, pattern in table if re.search(pattern, key)), "other")] += ms
    return {k: round(v, 1) for k, v in out.most_common()}


def profile(sides: dict) -> None:
    for name, run in sides.items():
        folder = os.path.join(FLAGS.profile, name)
        start = time.perf_counter()
        per_op = (torch_op_profile if hasattr(run, "torch") else xla_op_profile)(
            run, folder, FLAGS.profile_steps
        )
        wall_ms = (time.perf_counter() - start) * 1e3 / FLAGS.profile_steps
        kinds = collections.Counter()
        for op, ms in per_op.items():
            kinds[op_kind(op)] += ms
        by_part = None
        if hasattr(run, "torch"):
            by_part = parts(per_op, TORCH_PARTS, {})
        elif name.startswith("ours"):
            text = run.compiled().as_text()
            names = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", text, re.M))
            by_part = parts(per_op, OUR_PARTS, names)
        report(
            "lm_step_profile", side=name, op_ms_per_step=round(sum(per_op.values()), 1),
            wall_ms_per_step_profiled=round(wall_ms, 1), load_average=load_average(), by_part=by_part,
            by_kind={k: round(v, 1) for k, v in kinds.most_common()},
            top_ops={k: round(v, 2) for k, v in per_op.most_common(FLAGS.top)},
            all_ops={k: round(v, 3) for k, v in per_op.most_common()},
        )  # fmt: skip


# ------------------------------------------------------------------------------ main


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv):
    del argv
    sides = {}
    if FLAGS.nanogpt:
        sides["nanogpt"] = nanogpt_step()
    sides["ours"] = our_step()
    if FLAGS.b_patch or FLAGS.b_option:
        sides["ours_b"] = our_step(tuple(FLAGS.b_patch), tuple(FLAGS.b_option))
    if FLAGS.plain_jax:
        sides["plain_jax"] = plain_jax_step()
    for run in sides.values():  # compile and warm up
        for _ in range(FLAGS.warmup):
            run()
    if FLAGS.profile:
        profile(sides)
        return
    load_before = load_average()
    times = {name: [] for name in sides}
    for _ in range(FLAGS.iters):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    tokens = FLAGS.batch * FLAGS.length
    figures = {}
    for name, t in times.items():
        figures[f"{name}_ms"] = round(statistics.median(t) * 1e3, 1)
        figures[f"{name}_tokens_per_s"] = round(tokens / statistics.median(t))
    for anchor, other in itertools.permutations(times, 2):  # > 1: `other` faster than `anchor`
        if other != "nanogpt" and (anchor, other) != ("ours", "plain_jax"):
            pairs = [
                a / b for a, b in zip(times[anchor], times[other], strict=True)
            ]  # median over call pairs
            figures[f"{other}_vs_{anchor}"] = round(statistics.median(pairs), 3)
    torch_version = sys.modules["torch"].__version__ if "torch" in sys.modules else None
    report(
        "lm_step", batch=FLAGS.batch, length=FLAGS.length, vocab=FLAGS.vocab, overrides=FLAGS.set,
        config_overrides=FLAGS.config_set, b_patch=FLAGS.b_patch, b_option=FLAGS.b_option, **figures,
        ms_per_call={k: [round(s * 1e3, 1) for s in v] for k, v in times.items()},
        load_average_before=load_before, load_average_after=load_average(), torch=torch_version,
        torch_threads=sys.modules["torch"].get_num_threads() if torch_version else None,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
