"""How the commands (aimv2-train, aimv2-probe, aimv2-plot, aimv2-export) answer a mistake.

A user's mistake gets one line on stderr that names the argument and what was expected, and an
exit status, never a traceback:

* 2: the command line itself is wrong: an unknown option, a value of the wrong form or out of
  range, an unknown name (a preset, a model field). The parser's own errors are one line too.
* 1: the command line is well formed but what it points to cannot be used, or the run fails: a
  missing or unreadable file, broken data, a damaged checkpoint, a loss that became NaN.

Any other exception is a bug in the program and keeps its traceback. `--debug` on any command, or
AIMV2_DEBUG=1 in the environment, shows the traceback of the one-line errors too.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

DEBUG_ENV = "AIMV2_DEBUG"


class UsageError(ValueError):
    """A bad command-line value found after parsing: one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage first, 20 lines for
    aimv2-train) and a --debug flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help=f"show the Python traceback of an error (also: {DEBUG_ENV}=1)")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def debugging(argv: list[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run(prog: str, body: Callable[[], int | None], argv: list[str] | None, failures: tuple = ()) -> int:
    """body() as a command: its exit status, or 2 / 1 and one line for a UsageError / a run
    failure (OSError, and the exception types in `failures`)."""
    try:
        return body() or 0
    except UsageError as exc:
        if debugging(argv):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, *failures) as exc:
        if debugging(argv):
            raise
        print(f"{prog}: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """The message of an exception on one line (an OSError without a message: its class name)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
