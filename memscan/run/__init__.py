"""Run directories: sharded, resumable, idempotent detect (or mitigate) runs on one or many workers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memscan.config import DetectSettings
from memscan.errors import EXIT_FLAGGED, EXIT_OK, EXIT_PARTIAL, UsageError
from memscan.outputs import check_output
from memscan.run.executors import run_local, run_processes, run_ray, shards_for_rank, static_rank
from memscan.run.job import (
    DetectJob,
    RunOptions,
    ShardJob,
    ShardResult,
    ShardWorker,
    needs_work,
    prepare_run,
    summarize_run,
)
from memscan.run.progress import RunProgress
from memscan.run.rundir import RunDirectory, write_json

EXECUTORS = ("local", "ray")


@dataclass
class RunOutcome:
    """The summary written to summary.json and the exit code the CLI returns."""

    summary: dict[str, Any]
    exit_code: int


def _pending(run: RunDirectory, retry_errors: bool) -> list[int]:
    _, shards = run.plan()
    stats = run.all_stats()
    return [s.id for s in shards if needs_work(stats.get(s.id), retry_errors)]


def _devices(gpus: str | None, workers: int | None) -> list[str] | None:
    """Devices of the worker processes: `--gpus 0,1` / `--gpus all`, or N CPU/auto workers."""
    if gpus:
        import torch

        if gpus == "all":
            count = torch.cuda.device_count()
            if count == 0:
                raise UsageError("--gpus all: no CUDA device is visible")
            return [f"cuda:{i}" for i in range(count)]
        try:
            return [f"cuda:{int(g)}" for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise UsageError(f"--gpus {gpus!r}: give device indices like 0,1 or 'all'") from None
    if workers is not None and workers > 1:
        return ["cpu"] * workers
    return None


def run_detect(
    input_spec: str | Path,
    out_dir: str | Path,
    settings: DetectSettings,
    options: RunOptions | None = None,
    *,
    executor: str = "local",
    workers: int | None = None,
    gpus: str | None = None,
    fail_on_flagged: bool = False,
    log_interval: float = 60.0,
    interactive: bool | None = None,
    previous: str | Path | None = None,
    fail_on_new_flagged: bool = False,
) -> RunOutcome:
    """Plan or resume the run in `out_dir`, score its pending shards, write summary.json.

    `previous` (the last audit: a scores file or run directory) is read before any scoring; a
    complete run's summary then gets `changes` (memscan.diff), and `fail_on_new_flagged` exits
    EXIT_FLAGGED only when a prompt is newly flagged."""
    if fail_on_new_flagged and previous is None:
        raise UsageError("--fail-on-new-flagged needs --previous (the last audit's scores file or run directory)")
    prior = None
    if previous is not None:
        from memscan.diff import read_previous

        prior = read_previous(previous, out_dir, run_directory=True)
    from memscan.cache import open_cache

    open_cache(settings.cache)  # reachable (and writable, when local) before any worker loads a model
    outcome = run_job(
        input_spec, out_dir, DetectJob(settings), options, executor=executor, workers=workers, gpus=gpus,
        fail_on_flagged=fail_on_flagged, log_interval=log_interval, interactive=interactive,
    )
    if prior is not None:
        from memscan.diff import changes_since, load_scores

        # an unfinished run has no rows to compare yet: changes None
        changes = changes_since(prior, load_scores(out_dir)) if outcome.summary["complete"] else None
        outcome.summary["changes"] = changes
        write_json(RunDirectory(out_dir).summary_path, {k: v for k, v in outcome.summary.items() if k != "exit_code"})
        if fail_on_new_flagged and outcome.exit_code == EXIT_OK and changes and changes["newly_flagged"]:
            outcome.exit_code = outcome.summary["exit_code"] = EXIT_FLAGGED
    return outcome


def run_job(
    input_spec: str | Path,
    out_dir: str | Path,
    job: ShardJob,
    options: RunOptions | None = None,
    *,
    executor: str = "local",
    workers: int | None = None,
    gpus: str | None = None,
    fail_on_flagged: bool = False,
    log_interval: float = 60.0,
    interactive: bool | None = None,
) -> RunOutcome:
    """Plan or resume `job`'s run in `out_dir`, process its pending shards, write summary.json."""
    options = options or RunOptions()
    if executor not in EXECUTORS:
        raise UsageError(f"--executor {executor!r}: use {' or '.join(EXECUTORS)}")
    rank = static_rank()
    multi_rank = rank is not None and rank.world_size > 1
    if multi_rank and options.if_exists == "overwrite":
        raise UsageError("--if-exists overwrite cannot be used by several ranks at once; clear the directory first")
    check_run_output(input_spec, out_dir, options)
    started = time.perf_counter()
    run = prepare_run(input_spec, out_dir, job, options)
    if not multi_rank:
        run.remove_stale_temporaries()  # left by a killed attempt; never trusted, now swept
    todo = _pending(run, options.retry_errors)
    if multi_rank:
        todo = shards_for_rank(todo, rank)
        if job.scoring.device == "auto" and rank.local_rank is not None:
            import torch

            if torch.cuda.is_available():
                job = job.on_device(f"cuda:{rank.local_rank}")
    # progress counts this process's shards (all of them, unless it is one rank of several);
    # done shards being retried count again when done
    mine = _my_shards(run, rank)
    stats = run.all_stats()
    pending = set(todo)
    done_before = [stats[s.id] for s in mine if s.id in stats and s.id not in pending]
    progress = RunProgress(
        total_shards=len(mine), total_rows=sum(s.rows for s in mine), done_shards=len(done_before),
        done_rows=sum(s["rows"] for s in done_before), interval=log_interval, interactive=interactive,
    )
    results: list[ShardResult] = []

    def on_result(result: ShardResult) -> None:
        results.append(result)
        progress.shard_done(result.shard, rows=result.rows, ok=result.ok)

    finished = False
    try:
        devices = _devices(gpus, workers) if todo else None
        progress.start(_start_line(run, job, todo, executor, devices, rank))
        if todo:
            if executor == "ray":
                use_gpu = bool(gpus) or (job.scoring.device != "cpu" and _cuda_available())
                run_ray(str(run.root), job, todo, workers=len(devices or [None]), retry_errors=options.retry_errors,
                        on_result=on_result, use_gpu=use_gpu, progress=progress)
            elif devices is not None:
                run_processes(str(run.root), job, todo, devices, retry_errors=options.retry_errors,
                              on_result=on_result, progress=progress)
            else:
                run_local(str(run.root), job, todo, retry_errors=options.retry_errors, on_result=on_result,
                          progress=progress)
        finished = True
    finally:
        progress.close(final=finished)  # a failure (model not loadable, interrupt) says only its error
        summary = summarize_run(run, seconds=time.perf_counter() - started)
        summary["attempt"] = {
            "shards_processed": sum(r.ok for r in results), "shards_failed": sum(not r.ok for r in results),
            "rank": None if rank is None else rank.rank, "world_size": None if rank is None else rank.world_size,
        }
        write_json(run.summary_path, summary)
    mine_done = all(run.is_done(s) for s in _my_shards(run, rank))
    if not mine_done:
        code = EXIT_PARTIAL
    elif fail_on_flagged and summary["flagged"]:
        code = EXIT_FLAGGED
    else:
        code = EXIT_OK
    summary["exit_code"] = code
    return RunOutcome(summary=summary, exit_code=code)


def check_run_output(input_spec: str | Path, out_dir: str | Path, options: RunOptions) -> None:
    """Before any work: the run directory is not an input, not a file, and can be written."""
    from memscan import storage
    from memscan.run.plan import expand_inputs

    inputs = [storage.location(input_spec), *expand_inputs(input_spec)]
    check_output(out_dir, inputs=inputs, if_exists=options.if_exists, kind="run", what="run directory")


def _start_line(run: RunDirectory, job: ShardJob, todo: list[int], executor: str, devices: list[str] | None,
                rank: Any) -> str:
    """What this attempt does: the run, what is left of it, the model, and who scores it."""
    _, shards = run.plan()
    rows = sum(s.rows for s in shards)
    left = sum(shards[i].rows for i in todo)
    if not todo:
        work = "nothing left to do"
    else:
        work = f"{left} rows in {_plural(len(todo), 'shard')} to do"
    if executor == "ray":
        who = f"{_plural(len(devices or [None]), 'Ray actor')}"
    elif devices is not None:
        who = f"{_plural(len(devices), 'worker process', 'worker processes')} ({', '.join(devices)})"
    else:
        who = "this process"
    if rank is not None and rank.world_size > 1:
        who += f", rank {rank.rank} of {rank.world_size}"
    scoring = job.scoring
    return (f"{job.kind} run {run.root}: {rows} rows in {_plural(len(shards), 'shard')}, {work}; "
            f"model {scoring.model} ({scoring.method}, n_noise {scoring.n_noise}); {who}")


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _my_shards(run: RunDirectory, rank: Any) -> list[Any]:
    _, shards = run.plan()
    if rank is None or rank.world_size == 1:
        return shards
    return [s for s in shards if s.id % rank.world_size == rank.rank]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = [
    "DetectJob", "RunDirectory", "RunOptions", "RunOutcome", "ShardJob", "ShardWorker", "prepare_run", "run_detect",
    "run_job", "summarize_run",
]
