"""The one exception type for mistakes a user can make, and the CLI wrapper that prints it.

A `RaysweepError` message names the key, file or row at fault. The CLIs print it as one
line, without a traceback, and exit with status 2.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable


class RaysweepError(Exception):
    """A user-caused error: bad config, bad data, impossible resources."""


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI `main` so user errors and Ctrl-C print one line instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except RaysweepError as err:
            print(f"raysweep: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("raysweep: interrupted", file=sys.stderr)
            return 130

    return wrapper
