"""One exception type for bad input: CLIs print its message as a single line and exit 2."""

from __future__ import annotations

import functools
import sys


class ShearsError(Exception):
    """Bad input or configuration. The message is one line that names the fix."""


def cli_errors(main):
    """Decorate a CLI `main` so a ShearsError ends the run with one line on stderr, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ShearsError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except FileNotFoundError as err:
            print(f"error: file not found: {err.filename or err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
