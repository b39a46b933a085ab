"""User-facing errors and exit codes: one message naming the file (and line), no traceback.

Any code path that detects bad user input raises `UserError` (exit 2); a run stopped by its
numerical guard raises `TrainingStopped` (exit 3); a failed write of the run's files (a full
disk, a read-only directory) raises `WriteFailed` (exit 4); a finished run whose regression
guard fired exits 5 when eval.fail_on_regression is set (jaxsft.main). The command-line entry
points wrap their main in `run_cli`, which prints the message and exits with the error's code
(a traceback only with JAXSFT_DEBUG=1). docs/reliability.md lists every exit code.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable

# Exit codes of `python -m jaxsft.main` (docs/reliability.md).
EXIT_OK = 0  # finished, or stopped by train.stop_after (checkpoint saved)
EXIT_USER_ERROR = 2  # bad input, refused before anything was written
EXIT_TRAINING_STOPPED = 3  # non-finite or diverging training; the last good checkpoint is kept
EXIT_WRITE_FAILED = 4  # a checkpoint or run file could not be written (disk full, permissions)
EXIT_REGRESSION = 5  # finished (everything written and exported), but eval.fail_on_regression
# is set and a general-capability metric fell by more than eval.max_regression
EXIT_SIGNAL = 75  # stopped by SIGTERM / SIGINT after saving a checkpoint: rerun to resume
EXIT_ABORTED = 130  # a second Ctrl-C: aborted at once, without saving


class UserError(Exception):
    """Bad input from the user: a file, a config key, a data row.

    `where` is "path" or "path:line"; `hint` says what to do about it.
    """

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, where: str | os.PathLike | None = None, hint: str = ""):
        self.message = message
        self.where = str(where) if where is not None else None
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  -> {self.hint}"
        return text


class TrainingStopped(UserError):
    """The numerical guard stopped the run (non-finite steps or a diverging loss)."""

    exit_code = EXIT_TRAINING_STOPPED


class WriteFailed(UserError):
    """A file of the run could not be written (disk full, permissions, ...)."""

    exit_code = EXIT_WRITE_FAILED


def run_cli(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a CLI main: UserError (and its kinds) -> message on stderr and its exit code."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if os.environ.get("JAXSFT_DEBUG") == "1":
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)

    return wrapped


class _BestEffortFileHandler(logging.FileHandler):
    """The background-errors log is best effort: when it cannot be written (the disk that
    made the save fail is full), the record is dropped instead of printing logging's own
    traceback, and closing never raises."""

    def handleError(self, record):  # noqa: N802 - logging's name
        pass

    def close(self):
        try:
            super().close()
        except OSError:
            pass


@contextlib.contextmanager
def background_errors_to(log_path: str):
    """Route what background threads print about their own failures (orbax's async save
    threads, tensorstore callbacks: absl/asyncio error logs, unraisable and thread exceptions)
    into `log_path` instead of the terminal. The failure itself reaches the user as one
    message when the main thread next waits on the save (WriteFailed, exit 4). Nothing is
    rerouted with JAXSFT_DEBUG=1."""
    if os.environ.get("JAXSFT_DEBUG") == "1":
        yield
        return
    handler = _BestEffortFileHandler(log_path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    saved = [(lg, lg.propagate) for lg in loggers]
    hooks = sys.unraisablehook, threading.excepthook

    def unraisable(u):
        handler.emit(
            logging.makeLogRecord(
                {
                    "msg": f"{u.err_msg or 'unraisable'}: {u.exc_value!r}",
                    "name": "unraisable",
                    "levelname": "ERROR",
                }
            )
        )

    def thread_exception(a):
        handler.emit(
            logging.makeLogRecord(
                {
                    "msg": f"thread {a.thread}: {a.exc_value!r}",
                    "name": "thread",
                    "levelname": "ERROR",
                }
            )
        )

    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    sys.unraisablehook, threading.excepthook = unraisable, thread_exception
    try:
        yield
    except BaseException:
        # A failed save leaves orbax's asyncio tasks holding their exceptions; asyncio logs
        # "Task exception was never retrieved" with a traceback only when a task is garbage
        # collected, which may be at interpreter exit. The process is ending with the failure,
        # so its background reports keep going to the log until then.
        atexit.register(handler.close)
        raise
    sys.unraisablehook, threading.excepthook = hooks
    for lg, propagate in saved:
        lg.removeHandler(handler)
        lg.propagate = propagate
    handler.close()
