"""A detect job over a run directory: plan (or validate the plan), score pending shards, summarise.

The pieces every executor shares live here: `prepare_run` (manifest, fingerprint check,
staging), `ShardWorker` (one loaded scorer processing shard ids) and `summarize_run`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan import __version__
from memscan.config import DetectSettings, fingerprint
from memscan.errors import FingerprintMismatchError, InputError, UsageError, one_line
from memscan.io.readers import PromptSource
from memscan.io.scores import STATUS_OK, STATUS_SKIPPED_EMPTY, scores_schema, to_table
from memscan.models.device import dtype_name, resolve_device, resolve_dtype
from memscan.run.plan import InputFile, Shard, expand_inputs, make_plan, open_input, stage_text_input
from memscan.run.rundir import RunDirectory, describe_pid, read_json

log = logging.getLogger("memscan")

IF_EXISTS = ("resume", "overwrite", "fail")
_FAILED_STATUSES = ("error", "oom", "nonfinite")


@dataclass(frozen=True)
class RunOptions:
    """How a run directory is driven (none of it changes the numbers)."""

    shard_size: int = 10_000
    if_exists: str = "resume"
    retry_errors: bool = False

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise UsageError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.if_exists not in IF_EXISTS:
            raise UsageError(f"--if-exists {self.if_exists!r}: use {', '.join(IF_EXISTS)}")


def fingerprint_fields(
    settings: DetectSettings, inputs: list[InputFile], shard_size: int
) -> dict[str, Any]:
    """Everything that determines the output: settings, resolved profile and dtype, inputs, plan."""
    from memscan.models.loading import resolve_profile

    profile = resolve_profile(settings.model).with_overrides(**settings.profile_overrides())
    dtype = dtype_name(resolve_dtype(settings.dtype, resolve_device(settings.device)))
    fields = {k: v for k, v in settings.to_dict().items() if k not in ("batch_size", "device", "dtype")}
    fields["dtype"] = dtype
    fields.update({f"profile.{k}": v for k, v in profile.to_dict().items() if k != "calibration"})
    fields["inputs"] = [[Path(i.path).name, i.size, i.rows] for i in inputs]
    fields["shard_size"] = shard_size
    return fields


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def _plan_inputs(
    run: RunDirectory, input_spec: str | Path, settings: DetectSettings, shard_size: int
) -> list[InputFile]:
    """Count (Parquet: from the footer) or stage (text: one streaming pass) every input file."""
    inputs: list[InputFile] = []
    for index, path in enumerate(expand_inputs(input_spec)):
        source = PromptSource(path, prompt_column=settings.prompt_column, id_column=settings.id_column)
        size = path.stat().st_size
        if source.fmt == "parquet":
            inputs.append(InputFile(str(path.resolve()), source.count_rows(), size))
            continue
        staged = f"inputs/input-{index:05d}.parquet"
        log.info("staging %s into %s", path, staged)
        rows = stage_text_input(source, run.root / staged, shard_size)
        inputs.append(InputFile(str(path.resolve()), rows, size, staged))
    return inputs


def prepare_run(
    input_spec: str | Path, out_dir: str | Path, settings: DetectSettings, options: RunOptions
) -> RunDirectory:
    """Create the run directory's manifest, or check that an existing one matches these settings."""
    run = RunDirectory(out_dir)
    if run.root.exists() and not run.root.is_dir():
        raise UsageError(f"{run.root} exists and is not a directory")
    with run.lock():
        if run.exists():
            if options.if_exists == "fail":
                raise UsageError(f"{run.root} already holds a run; use --if-exists resume or overwrite")
            if options.if_exists == "overwrite":
                run.clear_outputs()
        if run.exists():
            manifest = run.manifest()
            inputs = [InputFile(**item) for item in manifest["inputs"]]
            current = [Path(p) for p in expand_inputs(input_spec)]
            if [str(p.resolve()) for p in current] != [i.path for i in inputs] or any(
                p.stat().st_size != i.size for p, i in zip(current, inputs, strict=True)
            ):
                raise FingerprintMismatchError(
                    f"{run.root} was made from other inputs ({', '.join(Path(i.path).name for i in inputs)}); "
                    "use --if-exists overwrite or another output directory"
                )
            new = fingerprint_fields(settings, inputs, options.shard_size)
            changed = _differences(manifest["fingerprint_fields"], new)
            if changed:
                raise FingerprintMismatchError(
                    f"{run.root} was made with different settings ({', '.join(changed)}); "
                    "rerun with the same settings, --if-exists overwrite, or another output directory"
                )
            return run
        inputs = _plan_inputs(run, input_spec, settings, options.shard_size)
        shards = make_plan(inputs, options.shard_size)
        if not shards:
            raise InputError(f"{input_spec}: no prompts (no rows in any input)")
        fields = fingerprint_fields(settings, inputs, options.shard_size)
        run.write_manifest({
            "kind": "detect",
            "memscan_version": __version__,
            "created": _now(),
            "settings": settings.to_dict(),
            "fingerprint": fingerprint(settings, {"fields": fields}),
            "fingerprint_fields": fields,
            "shard_size": options.shard_size,
            "inputs": [i.to_dict() for i in inputs],
            "shards": [[s.id, s.input, s.start, s.stop] for s in shards],
            "rows": sum(i.rows for i in inputs),
        })
    return run


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ShardResult:
    """What happened to one shard in this attempt."""

    shard: int
    ok: bool
    rows: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class ShardWorker:
    """Loads the model once and scores shards of one run directory."""

    def __init__(self, run_dir: str | Path, settings: DetectSettings, *, retry_errors: bool = False) -> None:
        from memscan.detect import build_scorer

        self.run = RunDirectory(run_dir)
        manifest = self.run.manifest()
        self.inputs, self.shards = self.run.plan()
        self.settings = settings
        self.retry_errors = retry_errors
        self.scorer = build_scorer(settings)
        self.schema = scores_schema(self.scorer.method.columns, store_prompt=settings.store_prompt)
        self.facts = {**self.scorer.run_facts(), "memscan_version": __version__,
                      "fingerprint": manifest["fingerprint"]}
        self.name = describe_pid()

    def pending(self, shard: Shard) -> bool:
        """Not done yet, or done with failed rows while retrying errors."""
        stats = read_json(self.run.stats_path(shard)) if self.run.is_done(shard) else None
        return needs_work(stats, self.retry_errors)

    def process(self, shard_id: int) -> ShardResult:
        """Score one shard and write it; failures are recorded, not raised (except interrupts)."""
        shard = self.shards[shard_id]
        try:
            if not self.pending(shard):
                return ShardResult(shard_id, ok=True)
            started = time.perf_counter()
            item = self.inputs[shard.input]
            source = open_input(item, self.run.root, self.settings.prompt_column, self.settings.id_column)
            frame = source.read_range(shard.start, shard.stop)
            if self.run.is_done(shard):
                scores = self._rescore_failed(shard, frame)
            else:
                scores = self.scorer.score_frame(frame)
            stats = shard_stats(scores, seconds=time.perf_counter() - started, worker=self.name)
            self.run.write_shard(shard, to_table(scores, self.schema, self.facts), stats)
            return ShardResult(shard_id, ok=True, rows=len(scores), stats=stats)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a broken shard must not stop the others
            message = one_line(exc, with_type=True, limit=500)
            log.error("shard %s failed: %s", shard.name, message)
            self.run.record_failure(shard, message, self.name)
            return ShardResult(shard_id, ok=False, error=message)

    def _rescore_failed(self, shard: Shard, frame: pd.DataFrame) -> pd.DataFrame:
        """Keep the shard's good rows; rescore only the rows whose status is a failure."""
        old = self.run.read_shard(shard).to_pandas()
        redo = old["status"].isin(_FAILED_STATUSES).to_numpy()
        fresh = self.scorer.score_frame(frame[redo].reset_index(drop=True))
        merged = old.copy()
        if "prompt" not in merged:
            merged["prompt"] = frame["prompt"].to_numpy()
        for column in fresh.columns:
            merged[column] = merged[column].astype(object)
            merged.loc[redo, column] = fresh[column].to_numpy()
        for name in self.scorer.method.columns:
            merged[name] = merged[name].astype(np.float32)
        merged["truncated"] = merged["truncated"].astype(bool)
        merged["flagged"] = merged["flagged"].astype("boolean")
        return merged


def needs_work(stats: dict[str, Any] | None, retry_errors: bool) -> bool:
    """Whether a shard with these stats (None: not done) is to be scored in this attempt."""
    return stats is None or (retry_errors and stats.get("failed_rows", 0) > 0)


def shard_stats(scores: pd.DataFrame, *, seconds: float, worker: str) -> dict[str, Any]:
    """Counts a shard's stats file carries (what `status` and the summary add up)."""
    status = scores["status"]
    flagged = scores["flagged"]
    return {
        "rows": int(len(scores)),
        "ok": int((status == STATUS_OK).sum()),
        "skipped_empty": int((status == STATUS_SKIPPED_EMPTY).sum()),
        "failed_rows": int(status.isin(_FAILED_STATUSES).sum()),
        "flagged": None if flagged.isna().all() else int(flagged.fillna(False).sum()),
        "seconds": round(seconds, 4),
        "finished": _now(),
        "finished_ts": time.time(),
        "worker": worker,
    }


def summarize_run(run: RunDirectory, *, seconds: float | None = None) -> dict[str, Any]:
    """Planned, done, failed and pending shards and rows, rate and ETA, from the markers alone."""
    manifest = run.manifest()
    shards = [Shard(*row) for row in manifest["shards"]]
    stats = run.all_stats()
    failures = {k: v for k, v in run.failures().items() if k not in stats}
    done_rows = sum(s["rows"] for s in stats.values())
    flagged_values = [s["flagged"] for s in stats.values() if s.get("flagged") is not None]
    stamps = sorted(s["finished_ts"] for s in stats.values() if "finished_ts" in s)
    busy = sum(s["seconds"] for s in stats.values())
    rate = None
    if len(stamps) >= 2 and stamps[-1] > stamps[0]:
        rate = sum(stats[i]["rows"] for i in stats) / max(stamps[-1] - stamps[0] + busy / len(stamps), 1e-9)
    elif busy > 0:
        rate = done_rows / busy
    remaining = manifest["rows"] - done_rows
    return {
        "run_dir": str(run.root),
        "fingerprint": manifest["fingerprint"],
        "shards": len(shards),
        "done": len(stats),
        "failed": len(failures),
        "pending": len(shards) - len(stats) - len(failures),
        "rows": manifest["rows"],
        "rows_done": done_rows,
        "scored": sum(s["ok"] for s in stats.values()),
        "skipped_empty": sum(s["skipped_empty"] for s in stats.values()),
        "failed_rows": sum(s["failed_rows"] for s in stats.values()),
        "flagged": sum(flagged_values) if flagged_values else None,
        "rate_rows_per_s": round(rate, 2) if rate else None,
        "eta_s": round(remaining / rate, 1) if rate and remaining else (0.0 if not remaining else None),
        "complete": len(stats) == len(shards),
        "failed_shards": {str(k): v["error"] for k, v in failures.items()},
        "seconds": round(seconds, 3) if seconds is not None else None,
    }


def settings_for_device(settings: DetectSettings, device: str | None) -> DetectSettings:
    """The settings a worker runs with: the same numbers, maybe its own device."""
    return settings if device is None else replace(settings, device=device)
