"""Output for people: a progress bar on a terminal, plain timestamped lines in a pipe or CI.
(Quieting Ray's own output is raysweep.sweep.ray_compat's.)

`Progress` is the one display of long work (decoding a dataset, running a sweep). On a
terminal it is a tqdm bar redrawn in place; anywhere else (CI, `| tee`, a file) it prints a
plain line at most every `every_s` seconds and once at the end, with no ANSI codes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def interactive(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stderr) is a terminal that can redraw a bar in place."""
    stream = stream or sys.stderr
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def python_command(*args: str | os.PathLike) -> str:
    """A command line for people to paste: `python_command("-m", "analysis.plot_scaling", d)`.

    It names the interpreter running now, whose packages the command needs (a bare `python`
    is often the system's, without pandas or Ray): `.venv/bin/python` when that is this working
    directory's venv, else its absolute path. Arguments are shell-quoted.
    """
    import shlex
    from pathlib import Path

    exe = Path(sys.executable)
    try:
        here = (Path.cwd() / ".venv").resolve() == Path(sys.prefix).resolve() and exe.parent.name == "bin"
    except OSError:  # the working directory is gone
        here = False
    python = f".venv/bin/{exe.name}" if here else shlex.quote(str(exe))
    return " ".join([python, *(shlex.quote(str(a)) for a in args)])


def format_duration(seconds: float | None) -> str:
    """`75` -> `1:15`, `3725` -> `1:02:05`; None or a negative/inf value -> `?`."""
    if seconds is None or not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`done` out of `total` units, with rate and ETA.

    `update(n)` adds work done; `set_total` changes the goal (e.g. epochs once early stopping
    is known); `write(line)` prints a line above the bar; `close()` ends it. The ETA is
    elapsed / done * remaining, so it follows the rate of the work seen so far.
    """

    def __init__(self, total: float, desc: str, unit: str = "it", *, stream: TextIO | None = None,
                 every_s: float = 10.0, enabled: bool = True, force_plain: bool = False, own_eta: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.every_s = every_s
        self.done = 0.0
        self.start = time.monotonic()
        self._last_line = self.start
        self._bar = None
        self._postfix = ""
        self.own_eta = own_eta  # False: the caller puts a better ETA in the postfix
        if enabled and not force_plain and interactive(self.stream):
            from tqdm import tqdm

            timing = "[{elapsed}<{remaining}, {rate_fmt}]" if own_eta else "[{elapsed}]"
            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, dynamic_ncols=True,
                             smoothing=0.1, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}{unit} " + timing + "{postfix}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def eta(self) -> float | None:
        if self.done <= 0:
            return None
        return self.elapsed / self.done * max(self.total - self.done, 0)

    def set_total(self, total: float) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def set_postfix(self, text: str) -> None:
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def update(self, n: float = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self._print(self.status())

    def status(self) -> str:
        """One plain line: `desc: 120/1,000 unit (12%), 40.1 unit/s, elapsed 0:03, ETA 0:22`."""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = self.done / self.elapsed if self.elapsed > 0 else 0.0
        extra = f", {self._postfix}" if self._postfix else ""
        eta = f", ETA {format_duration(self.eta())}" if self.own_eta else ""
        return (f"{self.desc}: {self.done:,.0f}/{self.total:,.0f} {self.unit}{pct}, {rate:,.1f} {self.unit}/s, "
                f"elapsed {format_duration(self.elapsed)}{eta}{extra}")

    def write(self, line: str) -> None:
        """Print a line of its own (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self._print(line)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.done:
            self._print(self.status())
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
