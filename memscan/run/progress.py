"""Progress for long runs: a rich bar on a terminal, else one plain line every `interval` seconds.

Cron mails stay readable (no carriage returns, no escape codes); interactive users get shards,
prompts, rate and ETA live.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RunProgress:
    """Counts shards and rows as workers report them."""

    def __init__(
        self, *, total_shards: int, total_rows: int, done_shards: int = 0, done_rows: int = 0,
        interval: float = 60.0, stream: TextIO | None = None, interactive: bool | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total_shards, self.total_rows = total_shards, total_rows
        self.done_shards, self.done_rows = done_shards, done_rows
        self.failed = 0
        self.interval = interval
        self.started = time.monotonic()
        self.rows_this_run = 0
        self._last_line = self.started
        is_tty = self.stream.isatty() if interactive is None else interactive
        self._bar: Progress | None = None
        if is_tty:
            self._bar = Progress(
                TextColumn("[bold]memscan"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                TextColumn("{task.fields[rows]} prompts, {task.fields[rate]}/s"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._task = self._bar.add_task("run", total=total_shards, completed=done_shards, rows=done_rows, rate="-")
            self._bar.start()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows_this_run / elapsed if elapsed > 0 else 0.0

    def advance(self, *, rows: int, ok: bool) -> None:
        """One shard finished (ok) or failed."""
        if ok:
            self.done_shards += 1
            self.done_rows += rows
            self.rows_this_run += rows
        else:
            self.failed += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done_shards, rows=self.done_rows, rate=f"{self.rate():.1f}")
        elif time.monotonic() - self._last_line >= self.interval:
            self.log_line()

    def log_line(self) -> None:
        self._last_line = time.monotonic()
        rate = self.rate()
        remaining = self.total_rows - self.done_rows
        eta = f"{remaining / rate:.0f}s" if rate > 0 else "?"
        print(
            f"memscan: {self.done_shards}/{self.total_shards} shards, {self.done_rows}/{self.total_rows} prompts, "
            f"{self.failed} failed, {rate:.1f} prompts/s, eta {eta}",
            file=self.stream, flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self.log_line()
