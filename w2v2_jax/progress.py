"""A one-line progress bar with rate and ETA, for jobs that count items (corpus synthesis), and the
HH:MM:SS format of an ETA (also the training log's)."""
from __future__ import annotations

import math
import sys
import time
from typing import Optional, TextIO

__all__ = ["ProgressBar", "format_eta"]


def format_eta(seconds: Optional[float]) -> str:
  """Seconds -> 'HH:MM:SS' (hours not wrapped at 24); '--:--:--' when unknown."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "--:--:--"
  s = int(round(seconds))
  return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressBar:
  """`bar(done, total)` after each item: redraws one line on a terminal, else writes a line per 10 %
  (and one at the end), e.g. `synthesising [###...] 120/1492 28.1/s ETA 00:00:48` on stderr.

  The rate counts items done since the first call, so work resumed from a previous run (the first
  `done` > 0) does not inflate it."""

  def __init__(self, label: str, stream: Optional[TextIO] = None, clock=time.monotonic):
    self._label, self._stream, self._clock = label, stream or sys.stderr, clock
    self._start, self._first, self._last_decile = clock(), None, -1

  def __call__(self, done: int, total: int) -> None:
    if self._first is None:
      self._first = done
    elapsed = self._clock() - self._start
    rate = (done - self._first) / elapsed if elapsed > 0 and done > self._first else 0.0
    eta = (total - done) / rate if rate > 0 else None
    frac = done / total if total else 1.0
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    line = f"{self._label} [{bar}] {done}/{total} {rate:.1f}/s ETA {format_eta(eta)}"
    if self._stream.isatty():
      self._stream.write("\r" + line + ("\n" if done >= total else ""))
    elif int(10 * frac) > self._last_decile or done >= total:
      self._last_decile = int(10 * frac)
      self._stream.write(line + "\n")
    self._stream.flush()
