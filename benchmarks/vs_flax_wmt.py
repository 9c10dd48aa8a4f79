"""Ours against the Flax WMT example's Transformer on the same shapes, alternating, in one process.

    git clone https://github.com/google/flax /tmp/flax     # the anchor; never copied in here
    python -m benchmarks.vs_flax_wmt --flax_dir=/tmp/flax --shape=quickstart
    python -m benchmarks.vs_flax_wmt --flax_dir=/tmp/flax --shape=base

The anchor is the example's own `examples/wmt/models.py` and `decode.py`, imported from the
checkout. Both sides: fp32, dropout 0.1, shared tied embeddings, Adam, label smoothing 0.1, full
rows of random tokens (ours in its pipeline format with segment ids and positions, the example
with its padding mask from tokens > 0, as each trains). Decoding: beam 4 (alpha 0.6) and greedy
(the example: its beam search with one beam), `new_tokens` tokens with EOS never chosen.
Calls alternate example, ours, example, ...; the JSON line has each round's median ms per side and
throughput ratios ours/example: the median, over all adjacent (example, ours) call pairs, of
example time / our time (> 1 = ours faster), which cancels the slow spells of a shared machine.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks.common import load_config, report, synthetic_batch, xla_op_profile
from flaxformer_lite import decoding, sharding
from flaxformer_lite.train import experiment

SHAPES = {  # d_model, heads, d_ff, layers (each stack), vocab, batch, length
    "quickstart": (128, 4, 512, 2, 4000, 32, 64),
    "base": (512, 8, 2048, 6, 32_000, 8, 128),
}

flags.DEFINE_string("flax_dir", os.environ.get("FLAX_DIR"), "A checkout of github.com/google/flax.")
flags.DEFINE_enum("shape", "quickstart", list(SHAPES), "Model and batch shape.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds (example, ours).")
flags.DEFINE_integer("iters", 5, "Timed train steps per round and side.")
flags.DEFINE_integer("decode_iters", 2, "Timed decode calls per round and side.")
flags.DEFINE_integer("decode_batch", 32, "Sentences per decode call.")
flags.DEFINE_integer("new_tokens", 64, "Tokens decoded per sentence.")
flags.DEFINE_bool("decode", True, "Also time beam-4 and greedy decoding.")
flags.DEFINE_float("dropout", 0.1, "Residual/embedding dropout rate on both sides.")
flags.DEFINE_bool("hlo_stats", False, "Print each train step's XLA cost analysis and op counts, then stop.")
flags.DEFINE_string(
    "profile",
    "",
    "Trace `iters` train steps per side with jax.profiler into this folder, print the time "
    "per compiled op (from the trace's thunk events), then stop.",
)
flags.DEFINE_multi_string("set", [], "Overrides of our model fields, e.g. --set=scan_layers=True.")
FLAGS = flags.FLAGS


def load_anchor(flax_dir: str | None):
    """The example's models and decode modules, from a flax checkout (never from this repository)."""
    wmt = os.path.join(flax_dir or "", "examples", "wmt")
    if not flax_dir or not os.path.isfile(os.path.join(wmt, "models.py")):
        raise SystemExit(
            f"--flax_dir={flax_dir!r} holds no examples/wmt/models.py; get the anchor with "
            "`git clone https://github.com/google/flax /tmp/flax` and pass --flax_dir=/tmp/flax."
        )
    modules = []
    for name in ("models", "decode"):
        spec = importlib.util.spec_from_file_location(f"flax_wmt_{name}", os.path.join(wmt, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


def anchor_fns(d, heads, ff, layers, vocab, batch, length):
    """(train_step thunk, {beams: decode thunk}) for the Flax example at this shape."""
    models, decode = load_anchor(FLAGS.flax_dir)
    cfg = models.TransformerConfig(
        vocab_size=vocab, output_vocab_size=vocab, share_embeddings=True, logits_via_embedding=True,
        dtype=jnp.float32, num_layers=layers, emb_dim=d, qkv_dim=d, mlp_dim=ff, num_heads=heads,
        max_len=512, dropout_rate=FLAGS.dropout, attention_dropout_rate=0.0, deterministic=False,
    )  # fmt: skip
    eval_cfg = cfg.replace(deterministic=True)
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.integers(3, vocab, (batch, length)), jnp.int32)
    targets = jnp.asarray(rng.integers(3, vocab, (batch, length)), jnp.int32)
    params = jax.jit(
        lambda: models.Transformer(eval_cfg).init(jax.random.key(0), inputs, targets)["params"]
    )()
    schedule = optax.warmup_cosine_decay_schedule(0, 2e-3, 150, 1000)
    tx = optax.adam(schedule, b1=0.9, b2=0.98, eps=1e-9)
    state = [params, tx.init(params)]

    def loss_fn(p, rng):  # the example's compute_weighted_cross_entropy, smoothing 0.1
        logits = models.Transformer(cfg).apply({"params": p}, inputs, targets, rngs={"dropout": rng})
        confidence, low = 0.9, 0.1 / (vocab - 1)
        normalizing = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
        soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low  # common_utils.onehot
        loss = -jnp.sum(soft * jax.nn.log_softmax(logits), axis=-1) - normalizing
        weights = (targets > 0).astype(jnp.float32)
        return jnp.sum(loss * weights) / jnp.sum(weights)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o, rng):
        loss, g = jax.value_and_grad(loss_fn)(p, rng)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    def train():
        state[0], state[1], loss = step(state[0], state[1], jax.random.key(1))
        return loss

    train.compiled = lambda: step.lower(state[0], state[1], jax.random.key(1)).compile()

    dec_cfg = eval_cfg.replace(decode=True)
    src = inputs[: FLAGS.decode_batch]
    max_dec = FLAGS.new_tokens + 1  # the example's beam search writes a leading 0 token

    def predict(params, src, beams):
        cache = models.Transformer(dec_cfg).init(
            jax.random.key(0), jnp.ones(src.shape, jnp.int32), jnp.ones((src.shape[0], max_dec), jnp.int32)
        )["cache"]
        encoded = models.Transformer(eval_cfg).apply(
            {"params": params}, src, method=models.Transformer.encode
        )
        encoded = decode.flat_batch_beam_expand(encoded, beams)
        raw = decode.flat_batch_beam_expand(src, beams)

        def ids_to_logits(flat_ids, flat_cache):
            logits, new_vars = models.Transformer(dec_cfg).apply(
                {"params": params, "cache": flat_cache}, encoded, raw, flat_ids, mutable=["cache"],
                method=models.Transformer.decode,
            )  # fmt: skip
            return logits.squeeze(1), new_vars["cache"]

        seqs, _ = decode.beam_search(
            src, cache, ids_to_logits, beam_size=beams, alpha=0.6, eos_id=-1, max_decode_len=max_dec
        )
        return seqs[:, -1, 1:]

    jitted = jax.jit(predict, static_argnums=2)
    decoders = {b: functools.partial(lambda b: jitted(state[0], src, b), b) for b in (4, 1)}  # current params
    return train, decoders


def our_fns(d, heads, ff, layers, vocab, batch, length):
    """The same for ours: config quickstart at this shape, our train step and decoders."""
    config = load_config("configs/quickstart.py")
    config.batch_size, config.max_length = batch, length
    over = config.model.overrides
    over.d_model, over.num_heads, over.d_ff = d, heads, ff
    over.num_encoder_layers = over.num_decoder_layers = layers
    over.dtype, over.dropout_rate = "float32", FLAGS.dropout
    for item in FLAGS.set:
        key, value = item.split("=", 1)
        over[key] = {"True": True, "False": False}.get(value, value if not value.isdigit() else int(value))
    config.label_smoothing, config.mesh_data = 0.1, 1
    exp = experiment.build(config, None, tokenizer="none", vocab_size=vocab)
    state, shardings = exp.init_state(jax.random.key(0))
    step = exp.train_step(shardings)
    holder = [state]
    with jax.set_mesh(exp.mesh):
        batch_arrays = sharding.global_batch(synthetic_batch(exp.task, batch, length, vocab), exp.mesh)

    def train():
        with jax.set_mesh(exp.mesh):
            holder[0], metrics = step(holder[0], batch_arrays, jax.random.key(1))
        return metrics["loss"]

    def compiled():
        with jax.set_mesh(exp.mesh):
            return step.lower(holder[0], batch_arrays, jax.random.key(1)).compile()

    train.compiled = compiled

    model = exp.inference_model
    src = batch_arrays["inputs"][: FLAGS.decode_batch]
    never = vocab + 1  # an id no logit has: EOS is never chosen, as the example's eos_id=-1

    def predict(params, src, beams):
        if beams == 1:
            return decoding.translate(model, params, src, FLAGS.new_tokens, eos_id=-1)
        return decoding.translate_beam(
            model, params, src, FLAGS.new_tokens, beams=beams, alpha=0.6, eos_id=never
        )

    jitted = jax.jit(predict, static_argnums=2)
    decoders = {b: functools.partial(lambda b: jitted(holder[0].params, src, b), b) for b in (4, 1)}
    return train, decoders


def op_profile(train, folder: str, steps: int) -> dict:
    """Milliseconds per train step by XLA op (`hlo_op` of the CPU thunk events) from a jax.profiler trace."""
    jax.block_until_ready(train())  # compiled and warm
    return xla_op_profile(lambda: jax.block_until_ready(train()), folder, steps)


def op_kind(op: str) -> str:
    """A coarse class of a compiled op's name, for the per-kind totals of --profile."""
    for kind, pattern in (
        ("matmul", r"dot|ynn|gemm|convolution"), ("reduce", r"reduce"),
        ("random", r"threefry|rng|random"), ("copy/transpose", r"copy|transpose|slice|concatenate|pad"),
        ("fusion (elementwise)", r"fusion"),
    ):  # fmt: skip
        if re.search(pattern, op):
            return kind
    return "other"


def main(argv):
    del argv
    shape = SHAPES[FLAGS.shape]
    d, heads, ff, layers, vocab, batch, length = shape
    # One CPU device for both sides (the tests' 8 fake devices would split only ours).
    sides = {"example": anchor_fns(*shape), "ours": our_fns(*shape)}
    if FLAGS.profile:
        for side, (train, _) in sides.items():
            per_op = op_profile(train, os.path.join(FLAGS.profile, side), FLAGS.iters)
            kinds = collections.Counter()
            for op, ms in per_op.items():
                kinds[op_kind(op)] += ms
            report(
                "vs_flax_wmt_profile", side=side, shape=FLAGS.shape,
                op_ms_per_step=round(sum(per_op.values()), 1),
                by_kind={k: round(v, 1) for k, v in kinds.most_common()},
                top_ops={k: round(v, 2) for k, v in per_op.most_common(25)},
            )  # fmt: skip
        return
    if FLAGS.hlo_stats:
        for side, (train, _) in sides.items():
            compiled = train.compiled()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            ops = collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", compiled.as_text()))
            report(
                "vs_flax_wmt_hlo", side=side, shape=FLAGS.shape, gflops=round(cost["flops"] / 1e9, 3),
                transcendentals=cost.get("transcendentals"), bytes_accessed=cost.get("bytes accessed"),
                top_ops=dict(ops.most_common(12)),
            )  # fmt: skip
        return
    # Alternate call by call (example, ours, example, ...) so that a slow spell of a shared machine
    # hits both sides alike; each round's figure is the median of its calls.
    kinds = {"train": lambda fns: fns[0], **({} if not FLAGS.decode else {
        "beam4": lambda fns: fns[1][4], "greedy": lambda fns: fns[1][1]})}  # fmt: skip
    times = {f"{side}_{kind}": [] for side in sides for kind in kinds}
    ratios = {}
    for kind, pick in kinds.items():
        calls = FLAGS.iters if kind == "train" else FLAGS.decode_iters
        for fns in sides.values():
            jax.block_until_ready(pick(fns)())  # compile and warm up
        pair_ratios = []
        for _ in range(FLAGS.rounds):
            round_times = {side: [] for side in sides}
            for _ in range(calls):
                for side, fns in sides.items():
                    start = time.perf_counter()
                    jax.block_until_ready(pick(fns)())
                    round_times[side].append(time.perf_counter() - start)
                pair_ratios.append(round_times["example"][-1] / round_times["ours"][-1])
            for side in sides:
                times[f"{side}_{kind}"].append(statistics.median(round_times[side]))
        # Throughput ratio ours/example: the median over adjacent (example, ours) call pairs.
        ratios[f"{kind}_ratio"] = round(statistics.median(pair_ratios), 3)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    figures = {k: [round(s * 1e3, 1) for s in v] for k, v in times.items() if v}  # ms per round
    tokens = batch * length
    report(
        "vs_flax_wmt",
        shape=FLAGS.shape,
        d_model=d, heads=heads, d_ff=ff, layers=layers, vocab=vocab, batch=batch, length=length,
        overrides=FLAGS.set, dropout=FLAGS.dropout,
        ours_train_tokens_per_s=round(tokens / med["ours_train"]),
        example_train_tokens_per_s=round(tokens / med["example_train"]),
        ms_per_round=figures,
        **ratios,
    )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
