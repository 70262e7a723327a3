"""Progress of a run directory: shards and rows, the rows counted per batch as workers report them.

The shown count is the rows of finished shards plus the rows of the batches done so far in the
shards being scored (a 2,000-prompt run of one shard moves with every batch, not once at the
end); a shard's count becomes exact when it is written. `status_lines` puts a run's summary
into words for `memscan status`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

from memscan.progress import Progress, format_duration, format_rate


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


class RunProgress(Progress):
    """Counts shards and rows as workers report batches and finished shards."""

    def __init__(
        self, *, total_shards: int, total_rows: int, done_shards: int = 0, done_rows: int = 0,
        interval: float = 60.0, stream: TextIO | None = None, interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval=interval, stream=stream, interactive=interactive, clock=clock,
                         total=total_rows, done=done_rows)
        self.total_shards, self.done_shards = total_shards, done_shards
        self.failed = 0
        self._live: dict[int, int] = {}  # rows done so far in shards being scored
        self._finished: set[int] = set()  # shards done in this attempt: late batch reports are ignored

    def rows(self) -> int:
        return self.done + sum(self._live.values())

    def shard_started(self, shard: int) -> None:
        """A worker took `shard` (again, if its last worker died: its rows count from zero)."""
        self._live[shard] = 0
        self._finished.discard(shard)

    def shard_rows(self, shard: int, rows: int) -> None:
        """A worker finished a batch of `rows` rows of `shard`."""
        if shard in self._finished or not rows:
            return
        self._live[shard] = self._live.get(shard, 0) + rows
        self.update()

    def shard_done(self, shard: int, *, rows: int, ok: bool) -> None:
        """`shard` was written (its `rows` input rows are done) or failed."""
        self._live.pop(shard, None)
        self._finished.add(shard)
        if ok:
            self.done_shards += 1
            self.done += rows
        else:
            self.failed += 1
        self.update()

    def describe(self) -> str:
        """'1/20 shards, 3200/100000 rows (3%), 412.5 rows/s, ETA 3 min 55 s' (failed shards when any)."""
        rows, rate = self.rows(), self.rate()
        share = int(100 * rows / self.total) if self.total else 100
        failed = f"{_plural(self.failed, 'failed shard')}, " if self.failed else ""
        return (f"{self.done_shards}/{self.total_shards} shards, {rows}/{self.total} rows ({share}%), {failed}"
                f"{format_rate(rate)} rows/s, ETA {self.eta(rate)}")


# ---------------------------------------------------------------------- memscan status

_SHOWN = {
    "run_dir", "kind", "fingerprint", "shards", "done", "failed", "pending", "rows", "rows_done", "scored",
    "skipped_empty", "failed_rows", "flagged", "rate_rows_per_s", "eta_s", "complete", "failed_shards", "seconds",
    "attempt", "exit_code",
}


def _value(key: str, value: Any) -> str:
    """A job's own fact or count in words: durations for seconds, '-' for nothing."""
    if value is None:
        return "-"
    if key.startswith("seconds") and isinstance(value, (int, float)):
        return format_duration(float(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def status_lines(summary: dict[str, Any]) -> list[str]:
    """A run's summary (summarize_run) as lines a person reads: no nulls, durations in words."""
    kind = summary.get("kind", "detect")
    shards, done, failed, pending = summary["shards"], summary["done"], summary["failed"], summary["pending"]
    rows, rows_done = summary["rows"], summary["rows_done"]
    if summary["complete"]:
        state = "complete"
    elif failed and not pending:
        state = f"stopped: {_plural(failed, 'shard')} failed; run the same command again to retry"
    else:
        state = f"not finished: {_plural(pending + failed, 'shard')} to do; run the same command to continue"
    share = int(100 * rows_done / rows) if rows else 100
    flagged = summary["flagged"]
    if kind == "mitigate":
        flag_line = ("above target", "-" if flagged is None else str(flagged))
    elif flagged is None:
        flag_line = ("flagged", "not calibrated (no threshold: nothing is flagged)" if done else "-")
    else:
        flag_line = ("flagged", str(flagged))
    rate = summary["rate_rows_per_s"]
    eta = summary["eta_s"]
    unknown = "unknown (no shard done yet)" if not done else "unknown"
    lines = [
        ("shards", f"{done} of {shards} done, {failed} failed, {pending} pending"),
        ("rows", f"{rows_done} of {rows} done ({share}%): {summary['scored']} scored, "
                 f"{summary['skipped_empty']} empty, {summary['failed_rows']} failed"),
        flag_line,
        ("rate", f"{format_rate(rate)} rows/s" if rate else unknown),
        ("ETA", "- (complete)" if summary["complete"] else
         ("- (only failed shards left)" if not pending else (format_duration(eta) if eta is not None else unknown))),
    ]
    if summary.get("seconds") is not None:
        lines.append(("took", format_duration(summary["seconds"])))
    lines += [(key.replace("_", " "), _value(key, value)) for key, value in summary.items() if key not in _SHOWN]
    lines.append(("fingerprint", str(summary["fingerprint"])))
    width = max(len(label) for label, _ in lines)
    out = [f"memscan {kind} run {summary['run_dir']}: {state}"]
    out += [f"  {label.ljust(width)}  {text}" for label, text in lines]
    out += [f"  shard {shard} failed: {error}" for shard, error in summary["failed_shards"].items()]
    return out
