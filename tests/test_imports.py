import os
import subprocess
import sys

import flaxformer_lite as fl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_core_modules_import_without_the_data_stack():
    """Models, training and decoding need neither sentencepiece nor TFDS; the pipeline needs no TFDS."""
    code = (
        "import sys; sys.modules['sentencepiece'] = None; sys.modules['tensorflow_datasets'] = None\n"
        "from flaxformer_lite import decoding, tasks\n"
        "from flaxformer_lite.data import pipeline, packing, prefetch\n"
        "from flaxformer_lite.model import models\n"
        "from flaxformer_lite.train import training\n"
        "from flaxformer_lite.ids import EOS_ID\n"
        "assert decoding.EOS_ID == EOS_ID == 1 and tasks.get('lm').model_class is models.DecoderOnly\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu"})


def test_importing_the_library_and_scripts_starts_no_jax_backend():
    """jax.distributed.initialize must come before any backend exists: no module may make an array at
    import (a module-level jnp constant in checksums.py once broke every multi-process run)."""
    code = (
        "import pkgutil, importlib, flaxformer_lite\n"
        "for m in pkgutil.walk_packages(flaxformer_lite.__path__, 'flaxformer_lite.'):\n"
        "    importlib.import_module(m.name)\n"
        "import train, eval, generate\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge._backends, sorted(xla_bridge._backends)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu"}, cwd=ROOT)
