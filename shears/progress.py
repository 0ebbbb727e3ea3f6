"""Progress bars that read well on a terminal and in a log: `progress(...)`, the one way shears opens a bar.

On a terminal (or in a notebook) it is tqdm as usual: one line redrawn in place. When stderr is not a
terminal -- `make demo > log 2>&1`, a batch job, CI -- a redrawn bar becomes carriage returns and cursor
moves in the file, and a bar that refreshes several times a second leaves thousands of them. There the
bar prints whole lines instead: at the start, at most one per LOG_INTERVAL seconds while it runs, one
whenever its owner refreshes it on purpose (the search after each evaluation), and the final one.

`interactive()` tells the rest (HF Trainer's own bar, see train_supernet.py) which of the two applies.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Iterable, TextIO

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as chosen_tqdm  # the notebook widget inside Jupyter, else tqdm.std's
from tqdm.std import tqdm as std_tqdm

LOG_INTERVAL = 30.0  # seconds between a bar's lines in a log: a 5-minute step leaves ten, not thousands
# No bar graphic in a log: the numbers say the same in a fifth of the bytes and need no terminal width
LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm moves the cursor between nested bars


class LogLines:
    """The file a log-mode bar writes to: tqdm's in-place redraws ("\\r" + text + padding, cursor moves)
    become whole lines; blank redraws and a line equal to the previous one are dropped."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last: str | None = None

    def write(self, text: str) -> None:
        for part in _CURSOR.sub("", text).replace("\r", "\n").split("\n"):
            line = part.rstrip()
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line

    def flush(self) -> None:
        self.stream.flush()


def interactive(stream: TextIO | None = None) -> bool:
    """True on a terminal or in a notebook (tqdm.auto picked its widget there): bars redraw in place."""
    stream = sys.stderr if stream is None else stream
    if chosen_tqdm is not std_tqdm:  # a notebook: its stderr is no tty, but the widget bar is interactive
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable: Iterable | None = None, *, desc: str, unit: str = "it", total: float | None = None,
             disable: bool = False, **options: Any) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand up to `total`); every shears bar opens through here.
    `options` go to tqdm, and win over the log-mode settings."""
    if not interactive():
        options = {"file": LogLines(sys.stderr), "mininterval": LOG_INTERVAL, "maxinterval": LOG_INTERVAL,
                   "miniters": 1, "bar_format": LOG_FORMAT if total is not None or _sized(iterable) else None,
                   **options}
    else:
        options = {"dynamic_ncols": True, **options}
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=disable, **options)


def _sized(iterable: Iterable | None) -> bool:
    """tqdm knows the total of an iterable with a length; the percentage format needs one."""
    try:
        len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


__all__ = ["LOG_INTERVAL", "LogLines", "interactive", "progress"]
