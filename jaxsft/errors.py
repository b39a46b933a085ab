"""User-facing errors: exit code 2, one message naming the file (and line), no traceback.

Any code path that detects bad user input raises `UserError`; the command-line entry points
wrap their main in `run_cli`, which prints the message and exits 2 (a traceback only with
JAXSFT_DEBUG=1).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user: a file, a config key, a data row.

    `where` is "path" or "path:line"; `hint` says what to do about it.
    """

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


def run_cli(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a CLI main: UserError -> message on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if os.environ.get("JAXSFT_DEBUG") == "1":
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
