"""The documentation: its API reference builds, and its code examples run (issue 37).

API reference: `scripts/api_docs.py` gives every module's docstrings to pdoc; the build must import
every module without starting a JAX backend and write a page per module.

Examples: every ```python block of README.md and docs/**/*.md runs as a script of its own (a
subprocess, JAX on CPU, in the repository root), so an example that rots fails here. A block that
cannot run on its own (it needs a HuggingFace checkpoint, or continues an example of another page)
says so on the line just above its opening fence, with the reason:

    <!-- not run: needs a save_pretrained() directory -->

(an HTML comment: the rendered page does not show it). Every other python block must run: keep
them tiny (fl.tiny(), a few tokens), as a reader would paste them.
"""

from __future__ import annotations

import glob
import os
import pkgutil
import re
import subprocess
import sys
from typing import NamedTuple

import pytest

import flaxformer_lite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUMPY_RANK_PROMOTION": "raise"}


class Block(NamedTuple):
    path: str  # relative to the repository root
    line: int  # of the first code line, 1-based
    code: str
    not_run: str | None  # the reason, where the block is marked


def python_blocks(text: str, path: str) -> list[Block]:
    """The ```python blocks of a markdown text, each with the reason it is not run (or None)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        mark = NOT_RUN.fullmatch(lines[i - 1].strip()) if i else None
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(path, i + 2, code, mark and mark.group(1)))
        i = end + 1
    return blocks


def _doc_blocks() -> list[Block]:
    paths = ["README.md", *sorted(glob.glob("docs/**/*.md", root_dir=ROOT, recursive=True))]
    blocks = []
    for path in paths:
        with open(os.path.join(ROOT, path)) as f:
            blocks += python_blocks(f.read(), path)
    return blocks


def test_python_blocks_are_found_with_their_marks():
    text = (
        "# Title\n\n```bash\npython train.py\n```\n"  # not python: never run
        "```python\nx = 1\n```\n"
        "<!-- not run: needs a checkpoint -->\n```python\nload('path/to/it')\nmore()\n```\n"
        "```python\n"  # unclosed at the end of the file: the rest
    )
    assert python_blocks(text, "a.md") == [
        Block("a.md", 7, "x = 1\n", None),
        Block("a.md", 11, "load('path/to/it')\nmore()\n", "needs a checkpoint"),
        Block("a.md", 15, "\n", None),
    ]


def test_the_readme_example_is_one_that_runs():
    readme = [b for b in _doc_blocks() if b.path == "README.md" and b.not_run is None]
    assert any("fl.DecoderOnly(cfg)" in b.code and "ops.dot_product_attention" in b.code for b in readme)


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(
            b, id=f"{b.path}:{b.line}", marks=[pytest.mark.skip(reason=b.not_run)] if b.not_run else []
        )
        for b in _doc_blocks()
    ],
)
def test_doc_example_runs(block, tmp_path):
    # Blank lines first, so a traceback's line numbers are the markdown file's.
    script = tmp_path / (block.path.replace("/", "_") + ".py")
    script.write_text("\n" * (block.line - 1) + block.code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"the example at {block.path}:{block.line} failed:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_the_api_reference_has_a_page_per_module_and_starts_no_jax_backend(tmp_path):
    out = tmp_path / "api"
    code = (
        "import sys; sys.path.insert(0, 'scripts')\n"
        "import api_docs; api_docs.build(sys.argv[1])\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge._backends, sorted(xla_bridge._backends)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not resolve" not in proc.stderr  # the lazy re-exports (fl.DecoderOnly, ...) are documented

    modules = [m.name for m in pkgutil.walk_packages(flaxformer_lite.__path__, "flaxformer_lite.")]
    missing = [m for m in modules if "._" not in m and not (out / (m.replace(".", "/") + ".html")).exists()]
    assert not missing
    expected = {  # page: text of its docstrings
        "flaxformer_lite/ops.html": "Pure JAX functions (no Flax)",
        "flaxformer_lite/model/models.html": "The three model families, built from one ModelConfig",
        "flaxformer_lite/data/pipeline.html": "From a random-access data source to per-host batches",
        "flaxformer_lite/train/loop.html": "The training loop",
        "flaxformer_lite/train/run_config.html": "for each field of",
        "flaxformer_lite/evaluation/run.html": "Evaluate a trained workdir",
        "flaxformer_lite.html": 'id="EncoderDecoder"',  # a lazy re-export, documented in full
    }
    for page, text in expected.items():
        assert text in (out / page).read_text(), f"{page} lacks {text!r}"
