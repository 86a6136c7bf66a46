"""Command-line binaries (absl flags), one library call each; `cli` is what they share.

Every binary runs as `app.run(experiments.cli(main))`: a user error (a missing or unreadable
file, a value the library refuses) ends the run with one line `error: <message>` on stderr and
exit status 1 instead of a traceback. `-v 1` (`--verbosity=1`) or `--pdb_post_mortem` shows
the traceback as usual.
"""

from __future__ import annotations

import functools
import logging as std_logging
import sys
from typing import Callable, Sequence

from absl import flags
from absl import logging

# The library's user errors: ValueError (and its subclasses wav.WavError,
# tragictalkers.LayoutError, torch_checkpoint.CheckpointError), OSError (FileNotFoundError,
# FileExistsError, h5py's unreadable files) and FloatingPointError
# (training.NonFiniteLossError: a diverged run, named with its step and last good checkpoint).
USER_ERRORS = (ValueError, OSError, FloatingPointError)


class QuietCheckpointing(std_logging.Filter):
    """Drops orbax's INFO lines (dozens per checkpoint saved or restored); warnings still pass."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def error_message(error: BaseException) -> str:
    """One line for the user: `<path>: <reason>` for an OSError of a file, else the message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


def _flag(name: str) -> bool:
    """The value of absl's boolean flag `name`, False where it is not defined."""
    return name in flags.FLAGS and bool(flags.FLAGS[name].value)


def cli(main: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
    """Wraps an absl `main(argv)`: quiet orbax logging, user errors as `error: ...`, exit 1."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str]) -> None:
        logging.get_absl_handler().addFilter(QuietCheckpointing())
        try:
            return main(argv)
        except USER_ERRORS as error:
            if logging.level_debug() or _flag("pdb_post_mortem"):
                raise
            print(f"error: {error_message(error)}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapped
