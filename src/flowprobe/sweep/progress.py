"""A sweep's progress line: runs done / total, failures, runs in flight, elapsed, time left, best so far.

On a terminal the line is redrawn in place (at most every 0.2 s); elsewhere (a log file, CI) a line is
written at most every 30 s, and always at the end. Standard library only.
"""

from __future__ import annotations

import shutil
import time
from typing import TextIO

__all__ = ["Progress"]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The progress line of one sweep.

    Args:
        name: the sweep's name, at the start of the line.
        total: the sweep's number of runs.
        stream: where to write (``sys.stderr`` for the command line).
        interval: seconds between two writes; default 0.2 on a terminal, 30 elsewhere.
    """

    def __init__(self, name: str, total: int, stream: TextIO, *, interval: float | None = None) -> None:
        self._name, self._total, self._stream = name, total, stream
        isatty = getattr(stream, "isatty", None)
        self._tty = bool(isatty and isatty())
        self._interval = interval if interval is not None else (0.2 if self._tty else 30.0)
        self._start = time.monotonic()
        self._last_write = -float("inf")
        self._first_done: int | None = None

    def line(self, done: int, failed: int, running: int, best: str | None) -> str:
        """The text of the line for these counts."""
        elapsed = time.monotonic() - self._start
        if self._first_done is None:
            self._first_done = done
        parts = [f"{self._name}: {done}/{self._total} runs done", f"{failed} failed", f"{running} running"]
        parts.append(f"{_clock(elapsed)} elapsed")
        new = done - self._first_done
        if 0 < new and done < self._total:
            parts.append(f"~{_clock(elapsed / new * (self._total - done))} left")
        text = ", ".join(parts)
        return f"{text} | best: {best}" if best else text

    def update(self, done: int, failed: int, running: int, best: str | None, *, final: bool = False) -> None:
        """Write the line if ``interval`` has passed since the last write, or if ``final``."""
        now = time.monotonic()
        text = self.line(done, failed, running, best)
        if not final and now - self._last_write < self._interval:
            return
        self._last_write = now
        if self._tty:
            width = shutil.get_terminal_size().columns - 1
            self._stream.write("\r" + text[:width] + "\x1b[K" + ("\n" if final else ""))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
