"""What a run is doing and how long it will take: one line per phase, always, and a
progress bar inside it unless the run is quiet.

A phase is one stretch of work with a known size: scoring a split, the search. Its
first line names it and its size and, when a rate is known, the time it will take; a
phase whose time cannot be guessed at its start says it once its first step is done.
Its last line gives the time it took. Rates are kept per unit ("example", "call"), so
the final test pass is estimated from the zero-shot one.
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
        self._estimated = unit in progress.rates

    def update(self, units: int) -> None:
        self.done += units
        if self._bar is not None:
            self._bar.update(units)
        elapsed = time.perf_counter() - self._started
        if elapsed > 0:
            self._progress.rates[self.unit] = (self.done - self._first) / elapsed
        if not self._estimated and self.done < self.total:
            self._estimated = True
            left = (self.total - self.done) / self._progress.rates[self.unit]
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
        self.rates: dict[str, float] = {}  # units per second, by unit

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
        guess = ""
        if unit in self.rates and (total - done) / self.rates[unit] >= WORTH_SAYING_S:
            guess = f", about {_duration((total - done) / self.rates[unit])}"
        self.say(f"{name}: {what or f'{total - done} {unit}s'}{guess}")
        with tqdm(total=total, initial=done, desc=name, unit=unit, leave=False, file=self.stream,
                  disable=not self.bars) as bar:
            phase = Phase(self, name, total, unit, done, bar if self.bars else None)
            yield phase
        self.say(f"{name}: done in {_duration(phase.seconds)}")
