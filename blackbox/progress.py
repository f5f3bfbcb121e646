"""What a run is doing and how long it will take: one line per phase, always, and a
progress bar inside it unless the run is quiet.

A phase is one stretch of work with a known size: scoring a split, the search. Its
first line names it and its size; once its first step is done, it says how long the
rest will take (when that is worth a line); its last line gives the time it took. The
estimate is the phase's own: an earlier phase's rate misleads, as the server keeps the
texts' keys and values from the zero-shot pass and the final test pass runs many times
faster.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

from tqdm.auto import tqdm

# Estimates shorter than this are not worth a line.
WORTH_SAYING_S = 5.0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Phase:
    """The phase being run: `update(n)` after each step of n units."""

    def __init__(self, progress: Progress, name: str, total: int, unit: str, done: int, bar: tqdm | None):
        self._progress, self.name, self.total, self.unit = progress, name, total, unit
        self.done = self._first = done
        self._bar = bar
        self._started = time.perf_counter()
        self._estimated = False

    def update(self, units: int) -> None:
        self.done += units
        if self._bar is not None:
            self._bar.update(units)
        elapsed = time.perf_counter() - self._started
        if not self._estimated and self.done < self.total and self.done > self._first:
            self._estimated = True
            left = (self.total - self.done) * elapsed / (self.done - self._first)
            if left >= WORTH_SAYING_S:
                self._progress.say(f"{self.name}: about {_duration(left)} left ({self.done - self._first} of "
                                   f"{self.total - self._first} {self.unit}s took {_duration(elapsed)})")

    def set_postfix(self, **values: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**values)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._started


class Progress:
    """Phases of one run, said on `stream` (stderr by default), or not at all when `silent`."""

    def __init__(self, bars: bool = True, stream: TextIO | None = None, silent: bool = False):
        self.bars = bars and not silent
        self.stream = stream
        self.silent = silent

    def say(self, line: str) -> None:
        if self.silent:
            return
        if self.bars:
            tqdm.write(line, file=self.stream or sys.stderr)
        else:
            print(line, file=self.stream or sys.stderr, flush=True)

    @contextmanager
    def phase(self, name: str, total: int, unit: str, what: str = "", done: int = 0) -> Iterator[Phase]:
        """Runs a phase of `total` units (`done` of them already, on a resume)."""
        self.say(f"{name}: {what or f'{total - done} {unit}s'}")
        with tqdm(total=total, initial=done, desc=name, unit=unit, leave=False, file=self.stream,
                  disable=not self.bars) as bar:
            phase = Phase(self, name, total, unit, done, bar if self.bars else None)
            yield phase
        self.say(f"{name}: done in {_duration(phase.seconds)}")
