"""Reading the files users give and the scripts prepare, and writing outputs whole or not at all.

Every reader of such a file (prepared datasets, spm.model, a transformers directory's config.json,
safetensors and tokenizer files) opens it inside `reading(path, fix)`: whatever the library under it
raises for a truncated or garbled file (RuntimeError from Riegeli or SentencePiece, SafetensorError,
JSONDecodeError, ...) becomes one `UnreadableFileError` naming the file and what to do, which the
scripts print as one line. `write_all` writes a set of output files so that a full disk leaves
the previous versions, never an empty or half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os


class UnreadableFileError(OSError):
    """A file that exists but cannot be read or parsed; the message names it and the fix."""


def reason(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` of the error's innermost cause, at most `limit` characters."""
    while e.__cause__ is not None:  # wrappers (tfds's "Failed to construct dataset ...") say less
        e = e.__cause__
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unreadable(path: str, e: BaseException, fix: str) -> UnreadableFileError:
    """`cannot read PATH (Type: message); FIX`, to raise from `e`."""
    return UnreadableFileError(f"cannot read {path} ({reason(e)}); {fix}")


@contextlib.contextmanager
def reading(path: str, fix: str):
    """Inside the block, any error but our own becomes `unreadable(path, error, fix)`."""
    try:
        yield
    except UnreadableFileError:
        raise
    except Exception as e:  # noqa: BLE001  (each library reports a damaged file its own way)
        raise unreadable(path, e, fix) from e


def replace_original(name: str) -> str:
    """The fix for a damaged file that came from elsewhere (a downloaded checkpoint's, say)."""
    return f"replace {name} with its original (download or copy it again)"


def read_json(path: str, fix: str):
    """The parsed JSON of `path`; a malformed file is an `UnreadableFileError` naming it and `fix`."""
    with reading(path, fix), open(path, encoding="utf-8") as f:
        return json.load(f)


def write_all(contents: dict[str, str], fix: str = "free space and rerun") -> None:
    """Write every {path: text} or none: each goes to a temporary file first, then all are renamed.

    A failed write (full disk, quota) removes the temporary files, keeps whatever each path held
    before, and raises an OSError naming the file that could not be written and `fix`.
    """
    temporaries = {path: f"{path}.tmp-{os.getpid()}" for path in contents}
    try:
        for path, tmp in temporaries.items():
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(contents[path])
                    f.flush()
                    os.fsync(f.fileno())  # a full disk can surface only here (or at close)
            except OSError as e:
                what = f"[Errno {e.errno}] {e.strerror}" if e.strerror else str(e)
                raise OSError(f"writing {path} failed ({what}); no output was changed: {fix}") from e
    except BaseException:
        for tmp in temporaries.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    for path, tmp in temporaries.items():
        os.replace(tmp, path)
