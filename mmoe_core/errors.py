"""Expected failures and the one way every command line reports them.

An *expected* failure is bad input, not a bug: a missing or truncated checkpoint, a folder that is not
one, weights that do not fit their config, a pickle where safetensors belong, NaN weights, a malformed
dataset, an absurd model size, wrong options. Code that detects one raises a :class:`UserError`
(usually one of its subclasses: ``CheckpointError``, ``DatasetError``, ``ConfigError`` ...) whose
message names the file and says what to do. Every CLI's ``main`` is wrapped by :func:`cli_entry`,
which prints such an error as one paragraph ``error: ...`` on stderr and returns exit status 2, with
no traceback. Any other exception is a bug and keeps its traceback.

The subclasses also derive from ``ValueError`` where the old error types did, so code that catches
``ValueError`` keeps working.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An expected failure caused by the input (files, options): the message names the file and the fix."""


class ConfigError(UserError, ValueError):
    """A model config (config.json, a named config, --opt values) or a training option is out of range."""


class BusyError(UserError, RuntimeError):
    """Another process holds the lock of the same output (a training or a precompute of the same run)."""


def one_paragraph(message: str) -> str:
    """The message without blank lines or trailing space (one paragraph), never empty."""
    lines = [line.rstrip() for line in str(message).splitlines() if line.strip()]
    return "\n".join(lines) or "failed (no message)"


def report(exc: BaseException, stream=None) -> int:
    """Print ``error: <message>`` for an expected failure; return the exit status."""
    print(f"error: {one_paragraph(str(exc))}", file=stream or sys.stderr)
    return EXIT_USER_ERROR


def cli_entry(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a CLI's ``main(argv) -> int``: a :class:`UserError` becomes ``error: ...`` and exit status 2.

    argparse's own errors already exit with status 2 and an ``error:`` line; anything else propagates
    (a bug: the traceback is what a developer needs)."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as exc:
            return report(exc)
        except KeyboardInterrupt:
            print("error: interrupted; nothing was published or replaced", file=sys.stderr)
            return 130

    return wrapper
