"""XLA CPU: the gradient of a tied LM head copies the [tokens, vocab] gradient into [vocab, tokens].

Plain JAX, no flaxformer_lite (the issue-32 write-up in benchmarks/RESULTS.md quotes its output):

    JAX_PLATFORMS=cpu python benchmarks/xla_cpu_repro.py

d/dE of sum(log_softmax(x E^T)) for x [32, 128, 192], E [4000, 192]. Autodiff asks for
dot_general(g, x) contracting the token axes, i.e. g^T x with g [4096, 4000]; XLA's CPU back end
(YNNPACK dot fusions) wants the contracted axis of the left operand minor, so it materialises g
a second time, transposed, as f32[4000, 4096] (64 MB), in a loop fusion that writes with a stride.
Written as (x^T g)^T the copy is of x ([4096, 192], 3 MB) and the [192, 4000] result.
With x flattened to 2-D before the einsum the compiler already picks the cheap order, which is
why only the 3-D form (every Transformer's [batch, length, d]) shows it.
"""

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

B, T, D, V = 32, 128, 192, 4000
x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D)), jnp.float32)
emb = jnp.asarray(np.random.default_rng(1).standard_normal((V, D)) * 0.05, jnp.float32)


def loss_3d(x, e):  # what every model writes: logits from [B, T, D]
    return jnp.sum(jax.nn.log_softmax(jnp.einsum("btd,vd->btv", x, e)))


def loss_2d(x, e):  # the same with the tokens flattened first
    return jnp.sum(jax.nn.log_softmax(x.reshape(-1, D) @ e.T))


@jax.custom_vjp
def head(x, e):
    return jnp.einsum("btd,vd->btv", x, e)


head.defvjp(
    lambda x, e: (head(x, e), (x, e)),
    lambda r, g: (jnp.einsum("btv,vd->btd", g, r[1]), jnp.einsum("btd,btv->dv", r[0], g).T),
)


def loss_3d_transposed_grad(x, e):  # the same 3-D head with d/dE written as (x^T g)^T
    return jnp.sum(jax.nn.log_softmax(head(x, e)))


fns = {f.__name__: jax.jit(jax.grad(f, argnums=(0, 1))) for f in (loss_3d, loss_2d, loss_3d_transposed_grad)}
want = fns["loss_3d"](x, emb)
times = {name: [] for name in fns}
for name, f in fns.items():
    text = f.lower(x, emb).compile().as_text()
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(f(x, emb), want, strict=True))
    copied = f"f32[{V},{B * T}]" in text
    print(f"{name:24s} f32[{V},{B * T}] copy in HLO: {copied!s:5s} max |grad - loss_3d's|: {err:.1e}")
for _ in range(15):  # alternate calls, so a busy spell of a shared machine hits all alike
    for name, f in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(f(x, emb))
        times[name].append(time.perf_counter() - start)
base = times["loss_3d"]
for name, t in times.items():
    ratio = statistics.median(b / a for a, b in zip(t, base, strict=True))
    print(f"{name:24s} {statistics.median(t) * 1e3:7.1f} ms (median of 15)  speed vs loss_3d {ratio:.2f}x")
print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, load average {np.round(os.getloadavg(), 2)}")
