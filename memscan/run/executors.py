"""Executors: who processes which shards. All of them write the same run directory.

- local: this process, shards in order (one GPU or the CPU).
- static rank: under torchrun / accelerate / Slurm, take shards with id % world_size == rank.
- processes: one worker process per device (`--gpus 0,1` or `--workers N`), pulling shard ids
  from a queue; a shard whose worker died is handed to another worker.
- ray: a pool of Ray actors (one GPU each, or CPU), each loading the pipeline once; a shard
  whose actor died is re-submitted to a fresh actor. The run directory must be on storage all
  nodes reach: a shared filesystem, or a bucket (`-o s3://bucket/audit/`: no shared filesystem
  needed; the storage options in force travel to the actors in their runtime environment).

Every executor tells `progress` (the parent's RunProgress) when a worker has loaded its model,
which shard it took, and the rows of every batch: worker processes through the results queue
they already use, Ray actors through a Ray queue the driver drains while it waits.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from memscan import storage
from memscan.errors import MemscanError, UsageError
from memscan.run.job import ShardJob, ShardResult, ShardWorker, job_for_device
from memscan.run.progress import RunProgress

log = logging.getLogger("memscan")

OnResult = Callable[[ShardResult], None]
MAX_ATTEMPTS = 3  # times a shard is handed out when its worker keeps dying


@dataclass(frozen=True)
class Rank:
    """This process's place in a multi-process launch."""

    rank: int
    world_size: int
    local_rank: int | None


def static_rank(env: dict[str, str] | None = None) -> Rank | None:
    """The rank a launcher gave this process (torchrun/accelerate, else Slurm), if any."""
    env = dict(os.environ if env is None else env)
    pairs = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    for rank_key, world_key, local_key in pairs:
        if rank_key in env and world_key in env:
            try:
                rank, world = int(env[rank_key]), int(env[world_key])
                local = int(env[local_key]) if local_key in env else None
            except ValueError as exc:
                raise UsageError(f"bad launcher environment: {rank_key}/{world_key} must be integers") from exc
            if not 0 <= rank < world:
                raise UsageError(f"bad launcher environment: {rank_key}={rank} with {world_key}={world}")
            return Rank(rank, world, local)
    return None


def shards_for_rank(shard_ids: Sequence[int], rank: Rank) -> list[int]:
    return [i for i in shard_ids if i % rank.world_size == rank.rank]


def run_local(run_dir: str, job: ShardJob, shard_ids: Sequence[int], *,
              retry_errors: bool, on_result: OnResult, progress: RunProgress | None = None) -> None:
    """Process shards in order in this process."""
    worker = ShardWorker(run_dir, job, retry_errors=retry_errors,
                         on_rows=None if progress is None else progress.shard_rows)
    if progress is not None:
        progress.model_loaded(worker.load_seconds, worker.describe())
    for shard_id in shard_ids:
        if progress is not None:
            progress.shard_started(shard_id)
        on_result(worker.process(shard_id))


# ---------------------------------------------------------------------- processes


def _process_main(run_dir: str, job: ShardJob, retry_errors: bool, threads: int,
                  tasks: Any, results: Any) -> None:
    """A worker process: load once, then process shard ids from `tasks` until a None arrives.

    Everything goes to the parent on `results`: loaded, start of a shard, rows per batch, done."""
    import torch

    torch.set_num_threads(threads)
    pid = os.getpid()

    def on_rows(shard_id: int, rows: int) -> None:
        results.put(("rows", pid, shard_id, rows))

    try:
        worker = ShardWorker(run_dir, job, retry_errors=retry_errors, on_rows=on_rows)
    except MemscanError as exc:
        results.put(("fatal", exc.exit_code, str(exc)))
        return
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        results.put(("fatal", 1, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("loaded", pid, worker.load_seconds, worker.describe()))
    while (shard_id := tasks.get()) is not None:
        results.put(("start", pid, shard_id))
        results.put(("done", pid, worker.process(shard_id)))


def run_processes(run_dir: str, job: ShardJob, shard_ids: Sequence[int], devices: Sequence[str], *,
                  retry_errors: bool, on_result: OnResult, progress: RunProgress | None = None) -> None:
    """One worker process per device, pulling shard ids from a shared queue."""
    import multiprocessing as mp

    context = mp.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    procs = {}
    for device in devices:
        proc = context.Process(
            target=_process_main, daemon=True,
            args=(run_dir, job_for_device(job, device), retry_errors, threads, tasks, results),
        )
        proc.start()
        procs[proc.pid] = proc
    attempts = dict.fromkeys(shard_ids, 1)
    for shard_id in shard_ids:
        tasks.put(shard_id)
    in_flight: dict[int, int] = {}
    remaining = set(shard_ids)
    try:
        while remaining:
            try:
                message = results.get(timeout=2.0)
            except queue.Empty:
                _recover_dead(procs, in_flight, attempts, remaining, tasks, on_result, progress)
                if not any(p.is_alive() for p in procs.values()):
                    log.error("all worker processes died; %d shards left for a rerun", len(remaining))
                    return
                continue
            if message[0] == "fatal":
                raise MemscanError(message[2]) if message[1] == 1 else _error_with_code(message[1], message[2])
            if message[0] == "loaded":
                if progress is not None:
                    progress.model_loaded(message[2], message[3])
            elif message[0] == "rows":
                if progress is not None:
                    progress.shard_rows(message[2], message[3])
            elif message[0] == "start":
                in_flight[message[1]] = message[2]
                if progress is not None:
                    progress.shard_started(message[2])
            else:
                result: ShardResult = message[2]
                in_flight.pop(message[1], None)
                remaining.discard(result.shard)
                on_result(result)
    finally:
        for _ in procs:
            tasks.put(None)
        for proc in procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


def _recover_dead(procs: dict[int, Any], in_flight: dict[int, int], attempts: dict[int, int],
                  remaining: set[int], tasks: Any, on_result: OnResult, progress: RunProgress | None = None) -> None:
    """Hand the shard of a worker that died to the others (a few times at most)."""
    for pid, proc in list(procs.items()):
        if proc.is_alive() or pid not in in_flight:
            continue
        shard_id = in_flight.pop(pid)
        if progress is not None:
            progress.shard_started(shard_id)  # its batches so far are lost: count from zero again
        if attempts[shard_id] < MAX_ATTEMPTS:
            attempts[shard_id] += 1
            log.warning("worker %d died on shard %d; handing it to another worker", pid, shard_id)
            tasks.put(shard_id)
        else:
            remaining.discard(shard_id)
            on_result(ShardResult(shard_id, ok=False, error=f"worker died {MAX_ATTEMPTS} times"))


def _error_with_code(code: int, message: str) -> MemscanError:
    error = MemscanError(message)
    error.exit_code = code
    return error


# ---------------------------------------------------------------------- ray


class _RayShardActor:
    """Holds one loaded ShardWorker inside a Ray actor; tells the driver's `events` queue its news."""

    def __init__(self, run_dir: str, job: ShardJob, retry_errors: bool, events: Any = None) -> None:
        def on_rows(shard_id: int, rows: int) -> None:
            events.put(("rows", shard_id, rows))

        self.worker = ShardWorker(run_dir, job, retry_errors=retry_errors,
                                  on_rows=None if events is None else on_rows)
        if events is not None:
            events.put(("loaded", self.worker.load_seconds, self.worker.describe()))

    def process(self, shard_id: int) -> ShardResult:
        return self.worker.process(shard_id)


def run_ray(run_dir: str, job: ShardJob, shard_ids: Sequence[int], *, workers: int,
            retry_errors: bool, on_result: OnResult, use_gpu: bool, progress: RunProgress | None = None) -> None:
    """A pool of Ray actors processing shard ids; a shard whose actor died goes to a new actor."""
    try:
        import ray
        from ray.exceptions import RayActorError
        from ray.util.queue import Queue
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'memscan[ray]'") from None

    if not ray.is_initialized():
        # joins the cluster named by RAY_ADDRESS if set, else starts a local instance
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 **({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": max(workers, 1)}))
    actor_class = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_restarts=0)(_RayShardActor)
    if os.environ.get(storage.ENV_OPTIONS):  # --storage-option reaches actors on every node
        env_vars = {storage.ENV_OPTIONS: os.environ[storage.ENV_OPTIONS]}
        actor_class = actor_class.options(runtime_env={"env_vars": env_vars})
    events = Queue(actor_options={"num_cpus": 0}) if progress is not None else None
    try:
        _drive_ray(ray, RayActorError, actor_class, events, run_dir, job, shard_ids, workers=workers,
                   retry_errors=retry_errors, on_result=on_result, progress=progress)
    finally:
        if events is not None:
            events.shutdown()


def _drain_ray_events(events: Any, progress: RunProgress | None) -> None:
    """Pass the actors' news (model loaded, rows per batch) on to the driver's progress."""
    if events is None or progress is None:
        return
    count = events.qsize()
    for message in events.get_nowait_batch(count) if count else []:
        if message[0] == "loaded":
            progress.model_loaded(message[1], message[2])
        else:
            progress.shard_rows(message[1], message[2])


def _drive_ray(ray: Any, actor_error: type[Exception], actor_class: Any, events: Any, run_dir: str, job: ShardJob,
               shard_ids: Sequence[int], *, workers: int, retry_errors: bool, on_result: OnResult,
               progress: RunProgress | None) -> None:
    """Hand shards to idle actors, collect results, replace dead actors; drain `events` meanwhile."""

    def new_actor() -> Any:
        return actor_class.remote(run_dir, job, retry_errors, events)

    idle = [new_actor() for _ in range(workers)]
    todo = list(shard_ids)
    attempts = dict.fromkeys(shard_ids, 0)
    running: dict[Any, tuple[Any, int]] = {}
    while todo or running:
        while todo and idle:
            actor, shard_id = idle.pop(), todo.pop(0)
            attempts[shard_id] += 1
            if progress is not None:
                progress.shard_started(shard_id)
            running[actor.process.remote(shard_id)] = (actor, shard_id)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=None if events is None else 0.5)
        _drain_ray_events(events, progress)  # an actor's batches reach the queue before its result
        if not ready:
            continue
        actor, shard_id = running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except actor_error:
            log.warning("ray actor died on shard %d; re-submitting to a new actor", shard_id)
            idle.append(new_actor())
            if attempts[shard_id] < MAX_ATTEMPTS:
                todo.append(shard_id)
            else:
                on_result(ShardResult(shard_id, ok=False, error=f"actor died {MAX_ATTEMPTS} times"))
            continue
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, MemscanError) else None
            if cause is not None:
                raise cause from None
            raise
        idle.append(actor)
        on_result(result)
