"""What the command-line scripts share: flag parsing and errors as one line, not a traceback."""

from __future__ import annotations

import os
import sys

from absl import flags

# What a user can fix (bad config, missing or bad files, a full disk): one line, no traceback.
USER_ERRORS = (ValueError, OSError)


def parse_flags(argv):
    """absl flags parser for the scripts: a bad --config.x override is a one-line error, not a traceback."""
    try:
        argv = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.keys()  # a config file that failed to load raises here, not later
        return argv
    except OSError as e:
        sys.exit(f"error: cannot load --config: {one_line(e.__cause__ or e)}")
    except flags.Error as e:  # a missing required flag, a value of the wrong type, a bad config file
        sys.exit(f"error: {one_line(e)} (see {os.path.basename(argv[0])} --helpfull)")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        sys.exit(f"error: bad --config override: {one_line(e)}")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (KeyError's own quotes removed)."""
    text = str(e)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # a KeyError's message (also when re-raised as another type) comes quoted
    text = text.replace("\\n", "\n").replace("\\'", "'")
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def exit_with_error(e: BaseException, status: int = 1, prefix: str = "error: ") -> None:
    """Print `error: <one line>` to stderr and end the process with `status`."""
    print(f"{prefix}{one_line(e)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # everything is saved or closed by now; skip the shutdown noise of orbax's threads


def text_lines(lines, counts: dict):
    """Lines as text; bytes that are not UTF-8 become U+FFFD and are counted."""
    for line in lines:
        if isinstance(line, bytes):
            text = line.decode("utf-8", errors="replace")
            counts["replaced_bytes"] += text.count("\ufffd") - line.count("\ufffd".encode())
            line = text
        yield line.rstrip("\r\n")
