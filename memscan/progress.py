"""Progress a person can follow: rows scored, rows/s and ETA, live on a terminal, as log lines elsewhere.

The library reports to a `Progress`: what is being scored (`start`), when the model is loaded
(`model_loaded`), and rows done after every batch (`advance`, the scorer's callback). How it is
shown is chosen once: a rich bar when the stream is a terminal, else one plain line every
`interval` seconds (no escape codes, no carriage returns, so cron mails stay readable). The rate
is counted from the end of model loading, which gets its own line, so it means scoring speed.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, TextColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

RowsCallback = Callable[[int], None]  # what the scorer's batch loop calls: rows done since the last call


def format_duration(seconds: float | None) -> str:
    """A duration as a person reads it: '3.2 s', '42 s', '12 min 5 s', '3 h 4 min', '2 d 1 h'; '-' if unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    if seconds < 10:
        return "0 s" if seconds == 0 else f"{seconds:.1f} s"
    total = round(seconds)
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def format_rate(rate: float | None) -> str:
    """Rows per second with one decimal, '-' before the first batch."""
    return "-" if rate is None else f"{rate:.1f}"


class Progress:
    """Counts rows against a total and shows rows, rows/s and ETA (a rich bar, or plain lines)."""

    def __init__(
        self, *, interval: float = 60.0, stream: TextIO | None = None, interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic, total: int = 0, done: int = 0,
    ) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.clock = clock
        self.total, self.done = total, done
        self._started = clock()  # when loading began (start) ...
        self._clock_start: float | None = None  # ... and when scoring began (model loaded)
        self._rows_at_clock = done
        self._last_time: float | None = None
        self._last_rows: int | None = None
        self.interactive = _isatty(self.stream) if interactive is None else interactive
        self._bar: RichProgress | None = None
        self._console: Console | None = None
        self._start_line: str | None = None
        self._closed = False

    # ------------------------------------------------------------------ what the library reports

    def start(self, line: str, *, total: int | None = None) -> None:
        """What is being scored (one line, also without a terminal); begins timing the model load.

        Without a terminal the line is shown with the first news (model loaded, rows, the end), so
        a run that fails while loading the model logs only its error; on a terminal it is shown at
        once, so a person is not left looking at nothing while a large model loads."""
        if total is not None:
            self.total = total
        self._started = self.clock()
        self._rows_at_clock = self.rows()
        self._start_line = line
        if self.interactive:
            self._start_line = None
            self.say(f"{line}; loading the model")

    def _begin(self) -> None:
        """Show the start line and, on a terminal, start the bar (once)."""
        if self._start_line is not None:
            line, self._start_line = self._start_line, None
            self.say(line)
        if self.interactive and self._bar is None and not self._closed:
            self._console = Console(file=self.stream, force_terminal=True)
            self._bar = RichProgress(
                TextColumn("memscan", markup=False), BarColumn(), TextColumn("{task.fields[text]}", markup=False),
                console=self._console, transient=False, redirect_stderr=False, redirect_stdout=False,
            )
            self._task = self._bar.add_task("scoring", total=max(self.total, 1), completed=self.rows(),
                                            text=self.describe())
            self._bar.start()

    def model_loaded(self, seconds: float | None = None, detail: str = "") -> None:
        """The model is loaded (`seconds` since `start` unless given); the rate is counted from now.

        With several workers, every load gets its line and the first one starts the rate clock."""
        now = self.clock()
        seconds = now - self._started if seconds is None else seconds
        self._begin()
        self.say(f"model loaded in {format_duration(seconds)}" + (f" ({detail})" if detail else ""))
        if self._clock_start is None:
            self._clock_start = now
            self._rows_at_clock = self.rows()

    def advance(self, rows: int) -> None:
        """`rows` more rows are done (the scorer calls this after every batch)."""
        if rows:
            self.done += rows
            self.update()

    def close(self, *, final: bool = True) -> None:
        """Show the final state (unless the last line already did) and stop the bar.

        `final=False` (the work failed): stop the bar and say nothing more; the error will."""
        if final:
            self._begin()
        if self._bar is not None:
            if final:
                self._bar.update(self._task, completed=self.rows(), text=self.describe())
            self._bar.stop()
            self._bar = None
        elif final and not self.interactive and self._last_rows != self.rows():
            self.log_line()
        self._closed = True

    # ------------------------------------------------------------------ what is shown

    def rows(self) -> int:
        """Rows done so far (a run adds the rows of shards still being scored)."""
        return self.done

    def rate(self) -> float | None:
        """Rows per second since the model was loaded (None before a row is done after it)."""
        start = self._started if self._clock_start is None else self._clock_start  # nothing loaded: from start
        elapsed = self.clock() - start
        counted = self.rows() - self._rows_at_clock
        return counted / elapsed if counted > 0 and elapsed > 0 else None

    def eta(self, rate: float | None) -> str:
        remaining = max(self.total - self.rows(), 0)
        if remaining == 0:
            return format_duration(0)
        return format_duration(remaining / rate) if rate else "-"

    def describe(self) -> str:
        """'3200/100000 rows (3%), 412.5 rows/s, ETA 3 min 55 s'."""
        rows, rate = self.rows(), self.rate()
        share = int(100 * rows / self.total) if self.total else 100
        return f"{rows}/{self.total} rows ({share}%), {format_rate(rate)} rows/s, ETA {self.eta(rate)}"

    def update(self) -> None:
        """Refresh the bar, or print a line when `interval` seconds have passed since the last one."""
        self._begin()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.rows(), text=self.describe())
        elif not self.interactive:
            now = self.clock()
            if self._last_time is None or now - self._last_time >= self.interval:
                self.log_line()

    def log_line(self) -> None:
        self._last_time, self._last_rows = self.clock(), self.rows()
        self.say(self.describe())

    def say(self, line: str) -> None:
        """One plain line, above the bar on a terminal (never read as markup)."""
        if self._bar is not None and self._console is not None:
            self._console.print(Text(f"memscan: {line}"), soft_wrap=True)
        elif self.interactive:
            Console(file=self.stream, force_terminal=True).print(Text(f"memscan: {line}"), soft_wrap=True)
        else:
            print(f"memscan: {line}", file=self.stream, flush=True)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
