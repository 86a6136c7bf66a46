"""Command-line binaries (absl flags), one library call each; `run` is what they share.

Every binary runs as `experiments.run(main)`: a user error (a missing or unreadable file, a
value the library refuses, a flag that is missing, malformed or inconsistent with another) ends
the run with one line `error: <message>` on stderr and exit status 1, instead of a traceback or
absl's full help text. `-v 1` (`--verbosity=1`) or `--pdb_post_mortem` shows the traceback of a
library error as usual.

Ctrl-C prints `error: interrupted (Ctrl-C)` and exits 130 (`exit_interrupted`). The first Ctrl-C
unwinds the run as a KeyboardInterrupt, so that temporary files are removed and a checkpoint
being written is finished or abandoned; the process then ends at once, without the interpreter's
shutdown, where background threads (orbax's checkpoint writer, the data readers) could hang or
abort. A second Ctrl-C ends the run where it stands; so does the first one, `INTERRUPT_GRACE_S`
seconds later, where a library swallowed its KeyboardInterrupt (Python drops an exception raised
in a weakref callback or `__del__`). Every output is safe under an abrupt end (atomic writes, resumable builds and
training), so the next run resumes.
"""

from __future__ import annotations

import functools
import logging as std_logging
import os
import signal
import sys
import threading
import traceback
from typing import Callable, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging

# The library's user errors: ValueError (and its subclasses wav.WavError,
# tragictalkers.LayoutError, torch_checkpoint.CheckpointError), OSError (FileNotFoundError,
# FileExistsError, h5py's unreadable files) and FloatingPointError
# (training.NonFiniteLossError: a diverged run, named with its step and last good checkpoint).
USER_ERRORS = (ValueError, OSError, FloatingPointError)


class QuietLibraries(std_logging.Filter):
    """Drops library log lines that read like failures but are not, for these binaries.

    - orbax's INFO lines (dozens per checkpoint saved or restored);
    - JAX's INFO lines on backends it could not start ("Unable to initialize backend 'tpu'"):
      it tries every platform it knows and runs on the CPU or GPU it found;
    - orbax's warning that a checkpoint item has no metadata file: a training checkpoint's
      `state/` is read directly (`training.checkpoints.load_variables`), and the file is in its
      parent step directory.
    Other warnings pass.
    """

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno < std_logging.WARNING:
            return "/orbax/" not in record.pathname and not (
                "/jax/" in record.pathname and "Unable to initialize backend" in record.getMessage())
        return not ("/orbax/" in record.pathname
                    and record.getMessage().startswith("Metadata file does not exist"))


def error_message(error: BaseException) -> str:
    """One line for the user: `<path>: <reason>` for an OSError of a file, else the message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


INTERRUPTED_MESSAGE = "error: interrupted (Ctrl-C)"
INTERRUPTED_STATUS = 130  # the shell's status for a process ended by SIGINT
# Seconds a run has after its first Ctrl-C to unwind before it is ended where it stands.
INTERRUPT_GRACE_S = 30.0
_exiting = threading.Lock()


def exit_interrupted() -> NoReturn:
    """Prints `INTERRUPTED_MESSAGE` and ends the process with `INTERRUPTED_STATUS` at once
    (`os._exit`: no atexit handlers, no joining of background threads). Called from several
    threads, the first call wins and the others wait for the end."""
    _exiting.acquire()  # never released: the process ends
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to say there
            pass
    try:
        print(INTERRUPTED_MESSAGE, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    os._exit(INTERRUPTED_STATUS)


def _end_now(signum, frame) -> None:
    """SIGINT handler with nothing to unwind: `exit_interrupted`."""
    del signum, frame
    exit_interrupted()


# `python -m experiments.<binary>` imports this package while it locates the binary (sys.argv[0]
# is "-m" then, as Python documents for -m), before the binary's own imports (JAX: seconds). A
# Ctrl-C during those has nothing to unwind and ends the process at once, instead of a
# traceback of the imports; `run` then installs the handling described above.
if sys.argv[:1] == ["-m"] and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _end_now)


def _first_interrupt(signum, frame) -> None:
    """SIGINT handler: a KeyboardInterrupt now; the next Ctrl-C, or `INTERRUPT_GRACE_S` seconds,
    end the process."""
    del signum, frame
    signal.signal(signal.SIGINT, _end_now)
    timer = threading.Timer(INTERRUPT_GRACE_S, exit_interrupted)
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def install_interrupt_handler() -> None:
    """Ctrl-C as described in the module docstring; from the main thread, before the run."""
    signal.signal(signal.SIGINT, _first_interrupt)


def _flag(name: str) -> bool:
    """The value of absl's boolean flag `name`, False where it is not defined."""
    return name in flags.FLAGS and bool(flags.FLAGS[name].value)


def cli(main: Callable[[Sequence[str]], None], takes_arguments: bool = False,
        ) -> Callable[[Sequence[str]], None]:
    """Wraps an absl `main(argv)`: quiet library logging, user errors (and `app.UsageError`) as
    `error: ...`, exit 1; a KeyboardInterrupt (Ctrl-C) as `exit_interrupted`, after its traceback
    with `-v 1`. Unless `takes_arguments`, a positional argument is a usage error (a path given
    without its flag would otherwise be ignored while the default is used)."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str]) -> None:
        logging.get_absl_handler().addFilter(QuietLibraries())
        try:
            if not takes_arguments and len(argv) > 1:
                raise app.UsageError(f"unexpected arguments {list(argv[1:])}: every input is a "
                                     "flag (--name=value)")
            return main(argv)
        except app.UsageError as error:  # flags that parse but do not go together
            print(f"error: {error} (--help lists the flags)", file=sys.stderr, flush=True)
            sys.exit(1)
        except USER_ERRORS as error:
            if logging.level_debug() or _flag("pdb_post_mortem"):
                raise
            print(f"error: {error_message(error)}", file=sys.stderr, flush=True)
            sys.exit(1)
        except KeyboardInterrupt:  # Ctrl-C: the files are whole (atomic writes, resumable builds)
            if logging.level_debug():
                traceback.print_exc()
            exit_interrupted()

    return wrapped


def run_argparse(main: Callable[[], int]) -> NoReturn:
    """Runs an argparse binary's `main()` (the converters') with the Ctrl-C handling of `run`,
    exiting with its status."""
    install_interrupt_handler()
    try:
        status = main()
    except KeyboardInterrupt:
        exit_interrupted()
    sys.exit(status)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing with a flag error (missing required flag, unparsable value) as one
    `error:` line and exit status 1 (absl prints `FATAL Flags parsing error` and a hint)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:  # several missing flags come one per line: joined
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"error: {message} (--help lists the flags)", file=sys.stderr, flush=True)
        sys.exit(1)


def run(main: Callable[[Sequence[str]], None], takes_arguments: bool = False) -> None:
    """`app.run` of `cli(main, takes_arguments)` with `parse_flags` and the Ctrl-C handler: what
    every binary's `__main__` calls."""
    install_interrupt_handler()
    app.run(cli(main, takes_arguments), flags_parser=parse_flags)
