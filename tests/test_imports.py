import subprocess
import sys

import flaxformer_lite as fl


def test_ops_and_config_import_without_flax():
    code = (
        "import sys; sys.modules['flax'] = None\n"  # any `import flax` now raises ImportError
        "from flaxformer_lite import ops, config\n"
        "import jax.numpy as jnp\n"
        "x = jnp.ones((1, 3, 2, 4))\n"
        "assert ops.dot_product_attention(x, x, x, is_causal=True).shape == x.shape\n"
        "assert config.tiny().head_dim == 6\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu"})


def test_public_names_resolve_and_have_docstrings():
    for name in fl.__all__:
        assert getattr(fl, name) is not None
    for name in fl.ops.__all__:
        obj = getattr(fl.ops, name)
        assert callable(obj) is False or obj.__doc__, f"ops.{name} has no docstring"
