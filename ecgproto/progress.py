"""One line per epoch on the terminal while a stage trains: which stage, how far, how well, how long to go.

Written to stderr with `write` (never `print`): inside a flow, Prefect turns prints, to stdout and stderr
alike, into INFO log records, which the commands keep off the console. `ECGPROTO_QUIET=1` silences it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class EpochProgress:
    """Callable as a trainer's `on_epoch(epoch, metrics)`; prints e.g.
    `train rhythm_1d/joint  epoch 3/30  loss 0.412  val macro-AUROC 0.873 (best 0.880)  ~4 min left at most`
    for the first and the last epoch, a new best, and otherwise at most every `every` seconds (a stage of
    hundreds of one-second epochs stays a few lines)."""

    def __init__(
        self,
        label: str,
        epochs: int,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        every: float = 10.0,
    ):
        self.label, self.epochs, self.clock, self.every = label, epochs, clock, every
        self.stream = stream
        self.start = clock()
        self.shown = float("-inf")
        self.first: int | None = None
        self.best = float("-inf")

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        if os.environ.get("ECGPROTO_QUIET"):
            return
        if self.first is None:
            self.first = epoch  # a resumed stage starts later: time only the epochs run here
        score = metrics.get("val_macro_auroc", float("nan"))
        improved = score > self.best
        self.best = max(self.best, score)
        now = self.clock()
        if not (epoch == self.first or epoch + 1 == self.epochs or improved or now - self.shown >= self.every):
            return
        self.shown = now
        done = epoch - self.first + 1
        left = (now - self.start) / done * (self.epochs - epoch - 1)
        eta = f"  ~{_duration(left)} left at most" if epoch + 1 < self.epochs else ""
        line = (
            f"{self.label}  epoch {epoch + 1}/{self.epochs}  loss {metrics.get('train_loss', float('nan')):.3f}  "
            f"val macro-AUROC {score:.3f} (best {self.best:.3f}){eta}"
        )
        _write(line, self.stream)


class CountProgress:
    """Progress of a count of items (e.g. records ingested) as lines, for a stream that is not a terminal (a log
    file, CI, a notebook's captured stderr), where a progress bar is switched off: `update(n)` after each batch;
    prints the first batch, then at most every `every` seconds, and the end, e.g.
    `ingest  5,120/21,799 records (23%)  1,480 records/s  ~11 s left`."""

    def __init__(
        self,
        label: str,
        total: int,
        done: int = 0,
        unit: str = "records",
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        every: float = 10.0,
    ):
        self.label, self.total, self.done, self.unit = label, total, done, unit
        self.stream, self.clock, self.every = stream, clock, every
        self.start, self.start_done = clock(), done
        self.shown = float("-inf")

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if os.environ.get("ECGPROTO_QUIET") or (now - self.shown < self.every and self.done < self.total):
            return
        self.shown = now
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        left = f"  ~{_duration((self.total - self.done) / rate)} left" if self.done < self.total and rate > 0 else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        _write(
            f"{self.label}  {self.done:,}/{self.total:,} {self.unit}{share}  {rate:,.0f} {self.unit}/s{left}",
            self.stream,
        )


def stage_line(text: str, stream: TextIO | None = None) -> None:
    """A one-line announcement of a stage that has no epochs (projection, evaluation, ...)."""
    if not os.environ.get("ECGPROTO_QUIET"):
        _write(text, stream)


def _write(line: str, stream: TextIO | None) -> None:
    out = stream or sys.stderr
    out.write(line + "\n")
    out.flush()
