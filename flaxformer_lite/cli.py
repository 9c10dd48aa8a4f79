"""What the command-line scripts share: flag parsing and errors as one line, not a traceback."""

from __future__ import annotations

import gc
import logging as pylogging
import os
import sys
import threading

from absl import flags, logging

# What a user can fix (bad config, missing or bad files, a full disk): one line, no traceback.
USER_ERRORS = (ValueError, OSError)


def need(ok: bool, message: str) -> None:
    """Raise the one-line `ValueError("bad config: <message>")` unless `ok` (config checks)."""
    if not ok:
        raise ValueError(f"bad config: {message}")


# Errors of background threads and finalizers (see cli.quiet_console): the log file only.
BACKGROUND_LOGGER = "flaxformer_lite.background"


class QuietLibraries:
    """Console log filter: orbax/TFDS/grain INFO chatter and tracebacks hidden (they go to the log file).

    Their plain warnings are still shown; our own one-line errors say what failed.
    """

    # asyncio: "Task exception was never retrieved" for each of orbax's failed writes (a full disk).
    NOISY = ("orbax", "tensorflow_datasets", "grain", "etils", "asyncio")

    def filter(self, record) -> bool:
        if record.name == BACKGROUND_LOGGER:  # errors of threads and finalizers while a script exits
            return False
        if not any(f"/{n}/" in record.pathname for n in self.NOISY):
            return True
        return record.levelno >= 30 and not record.exc_info


def quiet_console() -> None:
    """The scripts' console: library chatter and background-thread tracebacks go to the log file only.

    When a checkpoint write fails (a full disk), orbax's and tensorstore's threads raise hundreds of
    follow-on errors ("Event loop is closed") as they shut down; the main thread's one-line error says
    what failed. An uncaught error of the main thread still prints its traceback.
    """
    logging.get_absl_handler().addFilter(QuietLibraries())
    background = pylogging.getLogger(BACKGROUND_LOGGER)
    main_thread_hook = sys.excepthook

    def excepthook(*exc_info):  # also what C threads (tensorstore's callbacks) report through
        if threading.current_thread() is threading.main_thread():
            main_thread_hook(*exc_info)
        else:
            background.warning(
                "%s in thread %s", exc_info[0].__name__, threading.current_thread(), exc_info=exc_info
            )

    sys.excepthook = excepthook
    sys.unraisablehook = lambda u: background.warning(
        "%s in %r", u.exc_type.__name__, u.object, exc_info=(u.exc_type, u.exc_value, u.exc_traceback)
    )
    threading.excepthook = lambda a: background.warning(
        "%s in thread %s", a.exc_type.__name__, a.thread, exc_info=(a.exc_type, a.exc_value, a.exc_traceback)
    )


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
    """Print `error: <one line>` to stderr and end the process with `status`.

    Errors that background threads or finalizers raise while the process goes down (orbax's event loop
    closing, say) go to the log file, not the console, so the error stays the last line on its own.
    """
    quiet_console()
    gc.collect()  # finalizers (an event loop's __del__) run now, into the hooks above
    sys.stderr.write(f"{prefix}{one_line(e)}\n")  # one write, so no other writer splits the line
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
