"""Executors and interruptions: SIGKILL and resume, SIGINT, static ranks, worker processes, Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from memscan.config import DetectSettings
from memscan.run import RunOptions, run_detect
from memscan.run.executors import Rank, shards_for_rank, static_rank
from memscan.run.merge import merge_run

ROWS = 600  # every test runs the same prompts, so one uninterrupted reference run serves them all


def _write_prompts(path: Path, rows: int) -> Path:
    colours, subjects = ("red", "blue", "green"), ("cat", "tree")
    texts = [f"a {colours[i % 3]} {subjects[i % 2]} in the style of painter {i % 97}" if i % 23 else ""
             for i in range(rows)]
    pd.DataFrame({"prompt": texts}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.csv", ROWS)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """An uninterrupted single-process run of the same input (its shard size does not change the rows)."""
    root = tmp_path_factory.mktemp("reference")
    settings = DetectSettings(model=str(tiny_model_dir), device="cpu", batch_size=32)
    run_detect(prompts, root / "run", settings, RunOptions(shard_size=100))
    merge_run(root / "run", root / "reference.parquet")
    return pq.read_table(root / "reference.parquet").to_pandas()


def _cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "memscan", *map(str, args)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """Give the child Ctrl-C back: a suite started in the background of a non-interactive shell
    runs with SIGINT ignored, which Python (rightly) keeps, so a SIGINT test would never interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_stats(run: Path, count: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list((run / "stats").glob("part-*.json"))) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.returncode} {proc.stderr.read()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("run made no progress")


def _merged(run: Path, tmp_path: Path) -> pd.DataFrame:
    merge_run(run, tmp_path / "merged.parquet")
    return pq.read_table(tmp_path / "merged.parquet").to_pandas()


def _assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert got["prompt_id"].tolist() == want["prompt_id"].tolist()  # no row lost or duplicated
    assert got["status"].tolist() == want["status"].tolist()
    np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)


SMALL_SHARDS = 20  # rows per shard in the interruption tests: 30 shards, so the run is still going when signalled


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(
    tiny_model_dir: Path, prompts: Path, reference: pd.DataFrame, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shards = ROWS // SMALL_SHARDS
    args = ("detect", prompts, "-o", run, "--model", tiny_model_dir, "--shard-size", str(SMALL_SHARDS),
            "--batch-size", "32", "--device", "cpu")
    proc = _cli(*args)
    _wait_for_stats(run, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((run / "stats").glob("*.json")))
    assert done_before < shards, "the run finished before it was killed"
    outcome = run_detect(prompts, run, DetectSettings(model=str(tiny_model_dir), device="cpu", batch_size=32),
                         RunOptions(shard_size=SMALL_SHARDS))
    assert outcome.exit_code == 0 and outcome.summary["attempt"]["shards_processed"] == shards - done_before
    assert not list(run.rglob(".*.tmp"))
    _assert_same_rows(_merged(run, tmp_path), reference)


def test_sigint_exits_130_and_keeps_finished_shards(tiny_model_dir: Path, prompts: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _cli("detect", prompts, "-o", run, "--model", tiny_model_dir, "--shard-size", str(SMALL_SHARDS),
                "--device", "cpu")
    _wait_for_stats(run, 1, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    done = list((run / "stats").glob("*.json"))
    assert 1 <= len(done) < ROWS // SMALL_SHARDS
    assert all((run / "shards" / p.with_suffix(".parquet").name).is_file() for p in done)


def test_static_rank_from_launcher_environment() -> None:
    assert static_rank({}) is None
    assert static_rank({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Rank(1, 4, 1)
    assert static_rank({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}) == Rank(3, 8, 0)
    assert shards_for_rank(range(7), Rank(1, 3, None)) == [1, 4]
    with pytest.raises(Exception, match="RANK"):
        static_rank({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.slow  # 7.5 s of CPU: keeps the default suite under 5 minutes (the Ray and process-pool tests stay)
def test_two_ranks_write_the_same_run_as_one_process(
    tiny_model_dir: Path, prompts: Path, reference: pd.DataFrame, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = ("detect", prompts, "-o", run, "--model", tiny_model_dir, "--shard-size", "100", "--device", "cpu")
    procs = [_cli(*args, env={"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in (0, 1)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    stats = [pd.read_json(p, typ="series") for p in sorted((run / "stats").glob("*.json"))]
    assert len(stats) == 6 and len({s["worker"] for s in stats}) == 2
    _assert_same_rows(_merged(run, tmp_path), reference)


def test_worker_processes_pull_from_a_queue(
    tiny_model_dir: Path, prompts: Path, reference: pd.DataFrame, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    outcome = run_detect(prompts, run, DetectSettings(model=str(tiny_model_dir), device="cpu"),
                         RunOptions(shard_size=100), workers=2)
    assert outcome.exit_code == 0 and outcome.summary["done"] == 6
    _assert_same_rows(_merged(run, tmp_path), reference)


def test_ray_actors_write_the_same_run(
    tiny_model_dir: Path, prompts: Path, reference: pd.DataFrame, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    run = tmp_path / "run"
    try:
        outcome = run_detect(prompts, run, DetectSettings(model=str(tiny_model_dir), device="cpu"),
                             RunOptions(shard_size=100), executor="ray", workers=2)
    finally:
        ray.shutdown()
    assert outcome.exit_code == 0 and outcome.summary["done"] == 6
    workers = {pd.read_json(p, typ="series")["worker"] for p in (run / "stats").glob("*.json")}
    assert len(workers) == 2
    _assert_same_rows(_merged(run, tmp_path), reference)
