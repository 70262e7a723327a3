"""A job over a run directory: plan (or validate the plan), process pending shards, summarise.

The pieces every executor shares live here: `prepare_run` (manifest, fingerprint check,
staging), `ShardWorker` (one loaded scorer processing shard ids) and `summarize_run`. What a
shard's rows become is the job's: `DetectJob` scores them (memscan.mitigation.run's
`MitigateJob` rewrites them); everything else is the same for every kind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from memscan import __version__
from memscan.config import NOT_FINGERPRINTED, DetectSettings, fingerprint
from memscan.errors import FingerprintMismatchError, InputError, UsageError, one_line
from memscan.io.readers import PromptSource
from memscan.io.scores import STATUS_OK, STATUS_SKIPPED_EMPTY, scores_schema, to_table
from memscan.models.device import dtype_name, resolve_device, resolve_dtype
from memscan.run.plan import InputFile, Shard, expand_inputs, make_plan, open_input, stage_text_input
from memscan.run.rundir import RunDirectory, describe_pid, read_json

if TYPE_CHECKING:
    from memscan.scorer import Scorer

RowsCallback = Callable[[int], None]  # rows done since the last call (memscan.progress)
ShardRowsCallback = Callable[[int, int], None]  # (shard id, rows done since the last call)

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
    fields = {k: v for k, v in settings.to_dict().items() if k not in (*NOT_FINGERPRINTED, "dtype")}
    fields["dtype"] = dtype
    fields.update({f"profile.{k}": v for k, v in profile.to_dict().items() if k != "calibration"})
    fields["inputs"] = [[Path(i.path).name, i.size, i.rows] for i in inputs]
    fields["shard_size"] = shard_size
    return fields


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


class ShardJob(Protocol):
    """What a run directory computes from each shard's rows (a frozen, picklable value).

    Workers get it pickled (processes, Ray actors), load `scoring`'s model once, then call
    `read` and `compute` per shard; the manifest records `kind` and `manifest_entries()`.
    `compute` tells `progress` the rows it has done as it goes (the bar moves within a shard)."""

    kind: ClassVar[str]

    @property
    def scoring(self) -> DetectSettings: ...

    def on_device(self, device: str) -> ShardJob: ...

    def manifest_entries(self) -> dict[str, Any]: ...

    def fingerprint_fields(self, inputs: list[InputFile], shard_size: int) -> dict[str, Any]: ...

    def schema(self, scorer: Scorer) -> pa.Schema: ...

    def facts(self, scorer: Scorer) -> dict[str, Any]: ...

    def read(self, item: InputFile, run_root: Path, shard: Shard) -> pd.DataFrame: ...

    def compute(
        self, scorer: Scorer, frame: pd.DataFrame, progress: RowsCallback | None = None
    ) -> tuple[pd.DataFrame, dict[str, Any]]: ...

    def redo_failed(
        self, scorer: Scorer, frame: pd.DataFrame, old: pd.DataFrame, progress: RowsCallback | None = None
    ) -> tuple[pd.DataFrame, dict[str, Any]]: ...


@dataclass(frozen=True)
class DetectJob:
    """`memscan detect -o DIR`: one scores row per input row of each shard."""

    settings: DetectSettings
    kind: ClassVar[str] = "detect"

    @property
    def scoring(self) -> DetectSettings:
        return self.settings

    def on_device(self, device: str) -> DetectJob:
        """The same job on another device (a worker's own GPU); the numbers do not change."""
        return DetectJob(replace(self.settings, device=device))

    def manifest_entries(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict()}

    def fingerprint_fields(self, inputs: list[InputFile], shard_size: int) -> dict[str, Any]:
        return fingerprint_fields(self.settings, inputs, shard_size)

    def schema(self, scorer: Scorer) -> pa.Schema:
        return scores_schema(scorer.method.columns, store_prompt=self.settings.store_prompt)

    def facts(self, scorer: Scorer) -> dict[str, Any]:
        return scorer.run_facts()

    def read(self, item: InputFile, run_root: Path, shard: Shard) -> pd.DataFrame:
        source = open_input(item, run_root, self.settings.prompt_column, self.settings.id_column)
        return source.read_range(shard.start, shard.stop)

    def compute(
        self, scorer: Scorer, frame: pd.DataFrame, progress: RowsCallback | None = None
    ) -> tuple[pd.DataFrame, dict[str, Any]]:
        scores = scorer.score_frame(frame, progress=progress)
        return scores, {**score_counts(scores), **cache_counts(scores)}

    def redo_failed(
        self, scorer: Scorer, frame: pd.DataFrame, old: pd.DataFrame, progress: RowsCallback | None = None
    ) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Keep the shard's good rows; rescore only the rows whose status is a failure."""
        redo = old["status"].isin(_FAILED_STATUSES).to_numpy()
        fresh = scorer.score_frame(frame[redo].reset_index(drop=True), progress=progress)
        merged = old.copy()
        if "prompt" not in merged:
            merged["prompt"] = frame["prompt"].to_numpy()
        for column in fresh.columns:
            merged[column] = merged[column].astype(object)
            merged.loc[redo, column] = fresh[column].to_numpy()
        for name in scorer.method.columns:
            merged[name] = merged[name].astype(np.float32)
        merged["truncated"] = merged["truncated"].astype(bool)
        merged["flagged"] = merged["flagged"].astype("boolean")
        return merged, {**score_counts(merged), **cache_counts(fresh)}


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
        staged = run.staged_name(index)  # a store: under this starter's own prefix
        log.info("staging %s into %s", path, staged)
        rows = stage_text_input(source, run.root / staged, shard_size)
        inputs.append(InputFile(str(path.resolve()), rows, size, staged))
    return inputs


def prepare_run(
    input_spec: str | Path, out_dir: str | Path, job: ShardJob | DetectSettings, options: RunOptions
) -> RunDirectory:
    """Create the run directory's manifest, or check that an existing one matches this job."""
    job = DetectJob(job) if isinstance(job, DetectSettings) else job
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
            made_by = manifest.get("kind", "detect")
            if made_by != job.kind:
                raise FingerprintMismatchError(
                    f"{run.root} holds a `memscan {made_by}` run, not a {job.kind} run; "
                    "use --if-exists overwrite or another output directory"
                )
            inputs = [InputFile(**item) for item in manifest["inputs"]]
            current = expand_inputs(input_spec)  # local paths or URLs (memscan.storage)
            if [str(p.resolve()) for p in current] != [i.path for i in inputs] or any(
                p.stat().st_size != i.size for p, i in zip(current, inputs, strict=True)
            ):
                raise FingerprintMismatchError(
                    f"{run.root} was made from other inputs ({', '.join(Path(i.path).name for i in inputs)}); "
                    "use --if-exists overwrite or another output directory"
                )
            new = job.fingerprint_fields(inputs, options.shard_size)
            changed = _differences(manifest["fingerprint_fields"], new)
            if changed:
                raise FingerprintMismatchError(
                    f"{run.root} was made with different settings ({', '.join(changed)}); "
                    "rerun with the same settings, --if-exists overwrite, or another output directory"
                )
            return run
        inputs = _plan_inputs(run, input_spec, job.scoring, options.shard_size)
        shards = make_plan(inputs, options.shard_size)
        if not shards:
            raise InputError(f"{input_spec}: no prompts (no rows in any input)")
        fields = job.fingerprint_fields(inputs, options.shard_size)
        run.write_manifest({
            "kind": job.kind,
            "memscan_version": __version__,
            "created": _now(),
            **job.manifest_entries(),
            "fingerprint": fingerprint(job.scoring, {"fields": fields}),
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
    """Loads the model once and processes shards of one run directory with its job.

    `on_rows(shard, rows)` hears of every batch done (an executor passes it on to the parent's
    progress); `load_seconds` is how long loading the model took, which the rate leaves out."""

    def __init__(
        self, run_dir: str | Path, job: ShardJob | DetectSettings, *, retry_errors: bool = False,
        on_rows: ShardRowsCallback | None = None,
    ) -> None:
        from memscan.detect import build_scorer

        self.job = DetectJob(job) if isinstance(job, DetectSettings) else job
        self.run = RunDirectory(run_dir)
        manifest = self.run.manifest()
        self.inputs, self.shards = self.run.plan()
        self.settings = self.job.scoring
        self.retry_errors = retry_errors
        self.on_rows = on_rows
        started = time.perf_counter()
        load = getattr(self.job, "load_model", None)  # a job that needs more than scoring does (confirm: the VAE)
        self.scorer = build_scorer(self.settings, load() if load is not None else None)
        self.cache = None
        if getattr(self.settings, "cache", None):  # this worker's view of the score cache, read once
            from memscan.cache import ScoreCache

            self.cache = ScoreCache(self.settings.cache).bind(self.scorer)
            self.cache.load()
        self.load_seconds = time.perf_counter() - started
        self.schema = self.job.schema(self.scorer)
        self.facts = {**self.job.facts(self.scorer), "memscan_version": __version__,
                      "fingerprint": manifest["fingerprint"]}
        self.name = describe_pid()

    def describe(self) -> str:
        """Who loaded what, for the 'model loaded' line: 'worker host:123, cpu, float32'."""
        dtype = str(self.scorer.model.dtype).removeprefix("torch.")
        return f"worker {self.name}, {self.scorer.model.device}, {dtype}"

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
            frame = self.job.read(self.inputs[shard.input], self.run.root, shard)
            on_rows = self.on_rows
            progress = None if on_rows is None else (lambda rows: on_rows(shard_id, rows))
            if self.run.is_done(shard):
                old = self.run.read_shard(shard).to_pandas()
                rows, counts = self.job.redo_failed(self.scorer, frame, old, progress)
            else:
                rows, counts = self.job.compute(self.scorer, frame, progress)
            if self.cache is not None:  # its own new segment, before the shard's marker: a rerun reuses it
                self.cache.flush()
            # rows: the input rows the shard covers (a job may write fewer, e.g. only flagged ones)
            stats = {**counts, "rows": shard.rows, **_timing(time.perf_counter() - started, self.name)}
            self.run.write_shard(shard, to_table(rows, self.schema, self.facts), stats)
            return ShardResult(shard_id, ok=True, rows=shard.rows, stats=stats)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a broken shard must not stop the others
            message = one_line(exc, with_type=True, limit=500)
            log.error("shard %s failed: %s", shard.name, message)
            self.run.record_failure(shard, message, self.name)
            return ShardResult(shard_id, ok=False, error=message)


def needs_work(stats: dict[str, Any] | None, retry_errors: bool) -> bool:
    """Whether a shard with these stats (None: not done) is to be scored in this attempt."""
    return stats is None or (retry_errors and stats.get("failed_rows", 0) > 0)


def shard_stats(scores: pd.DataFrame, *, seconds: float, worker: str) -> dict[str, Any]:
    """Counts a detect shard's stats file carries (what `status` and the summary add up)."""
    return {**score_counts(scores), **_timing(seconds, worker)}


def score_counts(scores: pd.DataFrame) -> dict[str, Any]:
    """Rows, scored, empty, failed and flagged rows of a scores frame."""
    status = scores["status"]
    flagged = scores["flagged"]
    return {
        "rows": int(len(scores)),
        "ok": int((status == STATUS_OK).sum()),
        "skipped_empty": int((status == STATUS_SKIPPED_EMPTY).sum()),
        "failed_rows": int(status.isin(_FAILED_STATUSES).sum()),
        "flagged": None if flagged.isna().all() else int(flagged.fillna(False).sum()),
    }


def cache_counts(scores: pd.DataFrame) -> dict[str, int]:
    """Rows read from the score cache and rows scored, when a cache was used (memscan.cache)."""
    counts = scores.attrs.get("cache")
    return {} if counts is None else {"cache_reused": counts["reused"], "cache_scored": counts["scored"]}


def _timing(seconds: float, worker: str) -> dict[str, Any]:
    return {"seconds": round(seconds, 4), "finished": _now(), "finished_ts": time.time(), "worker": worker}


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
    # a job's own counts (manifest "counts") are added up too; its run-wide facts are copied
    extra = {key: _total(stats.values(), key) for key in manifest.get("counts", [])}
    cached = [s for s in stats.values() if "cache_reused" in s]  # shards scored with --cache
    cache = {"reused": _total(cached, "cache_reused"), "scored": _total(cached, "cache_scored"),
             "shards": len(cached)} if cached else None
    return {
        "run_dir": str(run.root),
        "kind": manifest.get("kind", "detect"),
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
        "cache": cache,
        **manifest.get("facts", {}),
        **extra,
    }


def _total(stats: Any, key: str) -> int | float:
    total = sum(s.get(key) or 0 for s in stats)
    return round(total, 3) if isinstance(total, float) else total


def job_for_device(job: ShardJob, device: str | None) -> ShardJob:
    """The job a worker runs: the same numbers, maybe on its own device."""
    return job if device is None else job.on_device(device)
