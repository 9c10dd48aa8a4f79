"""Build the API reference of every flaxformer_lite module (HTML, from the docstrings) with pdoc.

    JAX_PLATFORMS=cpu python scripts/api_docs.py --out=/tmp/flaxformer_lite_api   # open index.html

`python -m pdoc flaxformer_lite` alone follows the packages' `__all__`, which name the public
re-exports, not the submodules: it would document `ops` and nothing of model/, train/, ...
This passes pdoc each module that an `__all__` hides, so every module gets its page.
tests/test_docs.py builds it the same way (and checks that no JAX backend starts).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path

import pdoc

import flaxformer_lite


def module_specs() -> list[str]:
    """The modules to pass pdoc: the package, and each public module its parent's `__all__` leaves
    out (pdoc reaches every other module from its parent; naming one twice would be a warning)."""
    specs = ["flaxformer_lite"]
    for info in pkgutil.walk_packages(flaxformer_lite.__path__, "flaxformer_lite."):
        parent, _, name = info.name.rpartition(".")
        if name.startswith("_"):  # __main__: a command line, documented by its --help
            continue
        hidden_by = getattr(importlib.import_module(parent), "__all__", None)
        if hidden_by is not None and name not in hidden_by:
            specs.append(info.name)
    return specs


def build(out: str | Path) -> None:
    """Write the reference under `out` (index.html, flaxformer_lite/ops.html, .../train/loop.html)."""
    for name in flaxformer_lite.__all__:  # the lazy re-exports (models, layers), so pdoc sees them
        getattr(flaxformer_lite, name)
    pdoc.pdoc(*module_specs(), output_directory=Path(out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder to write the HTML pages to")
    build(parser.parse_args().out)
