"""Run directories in-process: complete runs, resume, fingerprints, retries, failures, merge, status."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from memscan.cli import app
from memscan.config import DetectSettings
from memscan.errors import FingerprintMismatchError, PartialRunError, UsageError
from memscan.run import RunDirectory, RunOptions, run_detect, summarize_run
from memscan.run.merge import merge_run

runner = CliRunner()


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.csv"
    texts = [f"a photo of object {i % 37} in style {i % 5}" if i % 11 else "" for i in range(120)]
    pd.DataFrame({"caption": texts}).to_csv(path, index=False)
    return path


def _settings(model_dir: Path, **kw: object) -> DetectSettings:
    return DetectSettings(**{"model": str(model_dir), "batch_size": 16, "device": "cpu", **kw})


def test_complete_run_then_resume_skips_done_shards(tiny_model_dir: Path, prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_detect(prompts, out, _settings(tiny_model_dir), RunOptions(shard_size=50), interactive=False)
    assert first.exit_code == 0
    summary = first.summary
    assert (summary["shards"], summary["done"], summary["rows"], summary["rows_done"]) == (3, 3, 120, 120)
    assert summary["skipped_empty"] == 11 and summary["complete"] and summary["pending"] == 0
    assert json.loads((out / "summary.json").read_text())["done"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == [[0, 0, 0, 50], [1, 0, 50, 100], [2, 0, 100, 120]]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = run_detect(prompts, out, _settings(tiny_model_dir, batch_size=3), RunOptions(shard_size=50))
    assert again.exit_code == 0 and again.summary["attempt"]["shards_processed"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == stamps
    merged = tmp_path / "merged.parquet"
    assert merge_run(out, merged) == 120
    table = pq.read_table(merged).to_pandas()
    assert table["prompt_id"].tolist() == [f"prompts.csv:{i}" for i in range(120)]
    assert json.loads(pq.read_schema(merged).metadata[b"memscan"])["complete"] is True


def test_run_equals_single_file_detect(tiny_model_dir: Path, prompts: Path, tmp_path: Path) -> None:
    from memscan.detect import detect

    run_detect(prompts, tmp_path / "run", _settings(tiny_model_dir), RunOptions(shard_size=32))
    merge_run(tmp_path / "run", tmp_path / "merged.parquet")
    sharded = pq.read_table(tmp_path / "merged.parquet").to_pandas()
    whole = detect(prompts, tmp_path / "one.parquet", _settings(tiny_model_dir)).scores
    assert sharded["prompt_id"].tolist() == whole["prompt_id"].tolist()
    assert sharded["status"].tolist() == whole["status"].tolist()
    np.testing.assert_allclose(sharded["score"], whole["score"], atol=1e-5)


def test_changed_setting_is_refused_naming_it(tiny_model_dir: Path, prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_detect(prompts, out, _settings(tiny_model_dir), RunOptions(shard_size=60))
    with pytest.raises(FingerprintMismatchError, match="seed"):
        run_detect(prompts, out, _settings(tiny_model_dir, seed=52), RunOptions(shard_size=60))
    with pytest.raises(FingerprintMismatchError, match="shard_size"):
        run_detect(prompts, out, _settings(tiny_model_dir), RunOptions(shard_size=70))
    with pytest.raises(UsageError, match="already holds a run"):
        run_detect(prompts, out, _settings(tiny_model_dir), RunOptions(shard_size=60, if_exists="fail"))
    result = runner.invoke(app, ["detect", str(prompts), "-o", str(out), "--model", str(tiny_model_dir),
                                 "--shard-size", "60", "--n-noise", "2", "--device", "cpu"])
    assert result.exit_code == 2 and "n_noise" in result.stderr
    options = RunOptions(shard_size=60, if_exists="overwrite")
    redo = run_detect(prompts, out, _settings(tiny_model_dir, seed=52), options)
    assert redo.exit_code == 0 and json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 52


def test_failed_shard_gives_partial_exit_then_resumes(
    tiny_model_dir: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memscan.io.readers import PromptSource

    original = PromptSource.read_range

    def flaky(self: PromptSource, start: int, stop: int) -> pd.DataFrame:
        if start == 50:
            raise OSError("disk hiccup")
        return original(self, start, stop)

    out = tmp_path / "run"
    monkeypatch.setattr(PromptSource, "read_range", flaky)
    partial = run_detect(prompts, out, _settings(tiny_model_dir), RunOptions(shard_size=50))
    assert partial.exit_code == 3
    status = summarize_run(RunDirectory(out))
    assert (status["done"], status["failed"], status["pending"]) == (2, 1, 0)
    assert status["failed_shards"] == {"1": "OSError: disk hiccup"}
    with pytest.raises(PartialRunError):
        merge_run(out, tmp_path / "m.parquet")
    assert merge_run(out, tmp_path / "m.parquet", allow_partial=True) == 70
    monkeypatch.setattr(PromptSource, "read_range", original)
    healed = run_detect(prompts, out, _settings(tiny_model_dir), RunOptions(shard_size=50))
    assert healed.exit_code == 0 and healed.summary["attempt"]["shards_processed"] == 1
    assert healed.summary["failed"] == 0 and not list((out / "failed").iterdir())


def test_retry_errors_rescores_only_failed_rows(tiny_model_dir: Path, prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_detect(prompts, out, _settings(tiny_model_dir), RunOptions(shard_size=50))
    run = RunDirectory(out)
    _, shards = run.plan()
    table = run.read_shard(shards[0])
    frame = table.to_pandas()
    good = frame.copy()
    frame.loc[[1, 4], "status"] = "oom"
    frame.loc[[1, 4], "score"] = np.nan
    frame.loc[[2], "score"] = 123.0  # a row that is NOT retried keeps its (tampered) value
    from memscan.io.scores import to_table
    from memscan.run.job import shard_stats

    run.write_shard(shards[0], to_table(frame, table.schema), shard_stats(frame, seconds=1.0, worker="test"))
    retried = run_detect(prompts, out, _settings(tiny_model_dir), RunOptions(shard_size=50, retry_errors=True))
    assert retried.exit_code == 0 and retried.summary["attempt"]["shards_processed"] == 1
    after = run.read_shard(shards[0]).to_pandas()
    assert after["status"].tolist() == good["status"].tolist()
    np.testing.assert_allclose(after.loc[[1, 4], "score"], good.loc[[1, 4], "score"], atol=1e-5)
    assert after.loc[2, "score"] == 123.0
    assert retried.summary["failed_rows"] == 0


def test_status_and_merge_commands(tiny_model_dir: Path, prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["detect", str(prompts), "-o", str(out), "--model", str(tiny_model_dir),
                                 "--shard-size", "40", "--json", "--threshold", "-100", "--fail-on-flagged"])
    assert result.exit_code == 10, result.output
    assert json.loads(result.stdout)["flagged"] == 109
    status = runner.invoke(app, ["status", str(out), "--json"])
    facts = json.loads(status.stdout)
    assert (facts["shards"], facts["done"], facts["rows_done"], facts["complete"]) == (3, 3, 120, True)
    assert runner.invoke(app, ["status", str(out)]).exit_code == 0
    merged = tmp_path / "m.parquet"
    assert runner.invoke(app, ["merge", str(out), "-o", str(merged)]).exit_code == 0
    assert pq.read_table(merged).num_rows == 120
    missing = runner.invoke(app, ["status", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a memscan run directory" in missing.stderr


def test_input_errors_in_run_mode_exit_4(tiny_model_dir: Path, tmp_path: Path) -> None:
    for bad in (tmp_path / "missing.csv", tmp_path / "empty-folder"):
        if bad.suffix == "":
            bad.mkdir()
        result = runner.invoke(app, ["detect", str(bad), "-o", str(tmp_path / "run"), "--model", str(tiny_model_dir)])
        assert result.exit_code == 4, result.output
        assert result.stderr.startswith("memscan: error:") and len(result.stderr.strip().splitlines()) == 1
