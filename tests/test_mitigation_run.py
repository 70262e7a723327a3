"""`memscan mitigate -o DIR`: the detect run-directory machinery, with rewrites for shards."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import memscan.mitigation
from memscan.cli import app
from memscan.config import DetectSettings
from memscan.detect import detect
from memscan.errors import FingerprintMismatchError, UsageError
from memscan.mitigation import MitigateSettings, mitigate
from memscan.mitigation.run import MitigateJob, resolve_target, run_mitigate
from memscan.run import RunDirectory, RunOptions, run_detect, summarize_run
from memscan.run.merge import merge_run
from memscan.run.rundir import describe_pid

runner = CliRunner()
REWRITE = memscan.mitigation.rewrite_prompts
SMALL = {"beam_width": 2, "max_edits": 1, "n_substitutes": 2, "insert_words": ("photo",), "min_similarity": 0.0}
SMALL_FLAGS = ["--beam-width", "2", "--max-edits", "1", "--min-similarity", "0"]
TEXTS = [
    "a photo of a cat", "a red square on a blue background", "", "the mona lisa by leonardo da vinci",
    "a dog in the park", "van gogh starry night", "a bowl of fruit", "  ", "a portrait of a man",
    "the great wave off kanagawa",
]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.csv"
    pd.DataFrame({"id": [f"r{i}" for i in range(len(TEXTS))], "prompt": TEXTS}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def target(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    """The median score of TEXTS on the tiny model: about half the prompts are above it."""
    path = tmp_path_factory.mktemp("target") / "p.csv"
    pd.DataFrame({"prompt": TEXTS}).to_csv(path, index=False)
    scores = detect(path, None, DetectSettings(model=str(tiny_model_dir), device="cpu")).scores["score"]
    return float(np.nanmedian(scores))


def _settings(model_dir: Path, target: float | None, **kw: object) -> MitigateSettings:
    detect_settings = DetectSettings(model=str(model_dir), device="cpu", id_column="id")
    return MitigateSettings(**{"detect": detect_settings, "target": target, **SMALL, **kw})


def _read(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


@pytest.fixture(scope="module")
def single(tiny_model_dir: Path, target: float, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, dict]:
    """(rows, summary) of the single-file `mitigate` of TEXTS: what every run directory must reproduce."""
    root = tmp_path_factory.mktemp("single")
    path = root / "prompts.csv"
    pd.DataFrame({"id": [f"r{i}" for i in range(len(TEXTS))], "prompt": TEXTS}).to_csv(path, index=False)
    summary = mitigate(path, root / "one.parquet", _settings(tiny_model_dir, target)).summary
    return _read(root / "one.parquet"), summary


def _same_rows(left: pd.DataFrame, right: pd.DataFrame) -> None:
    assert left.columns.tolist() == right.columns.tolist()
    for column in ("prompt_id", "prompt", "rewritten", "status"):
        assert left[column].tolist() == right[column].tolist(), column
    for column in ("edits", "trigger_tokens"):
        assert left[column].map(list).tolist() == right[column].map(list).tolist(), column
    for column in ("score_before", "score_after", "similarity"):
        np.testing.assert_allclose(left[column], right[column], atol=1e-5, err_msg=column)


def _counting_rewrites(monkeypatch: pytest.MonkeyPatch, fail_on: str | None = None) -> list[list[str]]:
    """Record the prompt ids of every frame given to rewrite_prompts (and fail a frame holding `fail_on`)."""
    calls: list[list[str]] = []

    def spy(scorer, frame, target, settings, progress=None):  # type: ignore[no-untyped-def]
        calls.append(frame["prompt_id"].tolist())
        if fail_on is not None and fail_on in calls[-1]:
            raise RuntimeError("search blew up")
        return REWRITE(scorer, frame, target, settings, progress=progress)

    monkeypatch.setattr(memscan.mitigation, "rewrite_prompts", spy)
    return calls


def test_run_directory_gives_the_single_file_rows(
    tiny_model_dir: Path, prompts: Path, target: float, single: tuple[pd.DataFrame, dict], tmp_path: Path
) -> None:
    settings = _settings(tiny_model_dir, target)
    outcome = run_mitigate(prompts, tmp_path / "run", settings, RunOptions(shard_size=4), interactive=False)
    assert outcome.exit_code == 0
    summary = outcome.summary
    assert (summary["kind"], summary["shards"], summary["done"], summary["rows_done"]) == ("mitigate", 3, 3, 10)
    assert merge_run(tmp_path / "run", tmp_path / "merged.parquet") == 10
    whole, single_summary = single
    merged = _read(tmp_path / "merged.parquet")
    _same_rows(merged, whole)
    assert merged["prompt_id"].tolist() == [f"r{i}" for i in range(10)]
    # the summary's counts add up the shards' and agree with the single-file summary
    assert summary["flagged"] == single_summary["attempted"] >= 3
    assert (summary["rewritten"], summary["unresolved"]) == (single_summary["ok"], single_summary["unresolved"])
    assert (summary["skipped_empty"], summary["not_flagged"], summary["written"]) == (
        2, single_summary["not_flagged"], 10)
    assert summary["target"] == target and json.loads((tmp_path / "run" / "summary.json").read_text())["done"] == 3
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["kind"] == "mitigate" and manifest["facts"] == {"target": target}
    assert manifest["settings"]["target"] == target and manifest["settings"]["max_edits"] == 1
    assert manifest["settings"]["similarity"] == "pooled"  # resolved from the profile, fingerprinted with the run
    assert json.loads(pq.read_schema(tmp_path / "merged.parquet").metadata[b"memscan"])["target"] == target


@pytest.mark.slow  # 5-9 s of CPU; detect's run-directory tests cover the same machinery by default
def test_failed_shard_resumes_alone_then_reruns_do_nothing(
    tiny_model_dir: Path, prompts: Path, target: float, single: tuple[pd.DataFrame, dict], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    settings = _settings(tiny_model_dir, target)
    calls = _counting_rewrites(monkeypatch, fail_on="r5")
    partial = run_mitigate(prompts, out, settings, RunOptions(shard_size=4), interactive=False)
    assert partial.exit_code == 3 and len(calls) == 3
    status = summarize_run(RunDirectory(out))
    assert (status["done"], status["failed"], status["pending"], status["rows_done"]) == (2, 1, 0, 6)
    assert status["failed_shards"] == {"1": "RuntimeError: search blew up"}
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}

    calls = _counting_rewrites(monkeypatch)
    healed = run_mitigate(prompts, out, settings, RunOptions(shard_size=4), interactive=False)
    assert healed.exit_code == 0 and healed.summary["attempt"]["shards_processed"] == 1
    assert calls == [["r4", "r5", "r6", "r7"]]  # only the failed shard is redone
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir() if p.name in stamps} == stamps
    assert healed.summary["failed"] == 0 and not list((out / "failed").iterdir())

    # a finished run: the same command does nothing and exits the same way
    (out / "stats" / "part-00002.json").unlink()  # ... except a shard whose output was lost
    again = run_mitigate(prompts, out, settings, RunOptions(shard_size=4), interactive=False)
    assert again.exit_code == 0 and calls[1:] == [["r8", "r9"]]
    done = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    idle = run_mitigate(prompts, out, settings, RunOptions(shard_size=4), interactive=False)
    assert idle.exit_code == 0 and idle.summary["attempt"]["shards_processed"] == 0 and len(calls) == 2
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == done
    merge_run(out, tmp_path / "resumed.parquet")
    _same_rows(_read(tmp_path / "resumed.parquet"), single[0])


@pytest.mark.slow  # 5-9 s of CPU; detect's run-directory tests cover the same machinery by default
def test_resume_with_other_settings_is_refused_in_one_line(
    tiny_model_dir: Path, prompts: Path, target: float, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    base = ["mitigate", str(prompts), "-o", str(out), "--model", str(tiny_model_dir), "--id-column", "id",
            "--device", "cpu", "--shard-size", "5", "--target", repr(target), *SMALL_FLAGS]
    first = runner.invoke(app, base)
    assert first.exit_code == 0, first.output
    assert "2/2 shards done" in first.stderr and "rewritten" in first.stderr
    for flag, value, named in (("--max-edits", "2", "mitigation.max_edits"), ("--target", "0.5", "mitigation.target"),
                               ("--seed", "52", "seed"), ("--shard-size", "4", "shard_size")):
        changed = runner.invoke(app, [*base, flag, value])
        assert changed.exit_code == 2, (flag, changed.output)
        assert len(changed.stderr.strip().splitlines()) == 1 and changed.stderr.startswith("memscan: error:")
        assert named in changed.stderr and "different settings" in changed.stderr
    # batch size and device do not change the numbers: the finished run is left as it is
    same = runner.invoke(app, [*base, "--batch-size", "3", "--json"])
    assert same.exit_code == 0 and json.loads(same.stdout)["attempt"]["shards_processed"] == 0
    with pytest.raises(FingerprintMismatchError, match="mitigation.beam_width"):
        run_mitigate(prompts, out, _settings(tiny_model_dir, target, beam_width=3), RunOptions(shard_size=5))
    overwrite = runner.invoke(app, [*base, "--max-edits", "2", "--if-exists", "overwrite"])
    assert overwrite.exit_code == 0 and json.loads((out / "manifest.json").read_text())["settings"]["max_edits"] == 2


def test_target_is_resolved_once_from_the_profile(
    tiny_model_dir: Path, prompts: Path, target: float, tmp_path: Path
) -> None:
    """Without --target the profile's threshold is the run's target, recorded before any shard runs."""
    profile = tmp_path / "tiny.toml"
    profile.write_text(f'name = "tiny"\nsource = "{tiny_model_dir}"\nresolution = 64\nthreshold = {target!r}\n',
                       encoding="utf-8")  # 64: the tiny model's native size, as its default profile has
    settings = MitigateSettings(detect=DetectSettings(model=str(profile), device="cpu", id_column="id"), **SMALL)
    assert resolve_target(settings) == target
    outcome = run_mitigate(prompts, tmp_path / "run", settings, RunOptions(shard_size=4))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["facts"]["target"] == target == manifest["fingerprint_fields"]["mitigation.target"]
    merge_run(tmp_path / "run", tmp_path / "m.parquet")
    rows = _read(tmp_path / "m.parquet")
    above = rows["score_before"].astype(float) > target
    assert rows.loc[above, "status"].isin(["ok", "unresolved"]).all() and outcome.summary["flagged"] == above.sum()
    assert (rows.loc[~above, "status"] != "ok").all()
    assert resolve_target(MitigateSettings(detect=DetectSettings(model=str(profile)), target=0.5)) == 0.5
    # the threshold was calibrated for unweighted scores: changing the weights drops it, so no target
    with pytest.raises(UsageError, match="--target"):
        resolve_target(MitigateSettings(detect=DetectSettings(model=str(profile), w_norm=2.0)))
    with pytest.raises(UsageError, match="--target"):
        resolve_target(MitigateSettings(detect=DetectSettings(model=str(tiny_model_dir))))
    with pytest.raises(ValueError, match="resolved target"):
        MitigateJob(settings)


@pytest.mark.slow  # 5-9 s of CPU; detect's run-directory tests cover the same machinery by default
def test_new_flags_reach_the_settings_and_the_scores(
    tiny_model_dir: Path, prompts: Path, target: float, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    weights = ["--w-norm", "3", "--w-align", "0.5"]
    result = runner.invoke(app, ["mitigate", str(prompts), "-o", str(out), "--model", str(tiny_model_dir),
                                 "--id-column", "id", "--device", "cpu", "--target", repr(target), *weights,
                                 "--v-convention", "raw", "--allow-pickle", *SMALL_FLAGS])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    detect_settings = manifest["settings"]["detect"]
    assert (detect_settings["w_norm"], detect_settings["w_align"]) == (3.0, 0.5)
    assert (detect_settings["v_convention"], detect_settings["allow_pickle"]) == ("raw", True)
    assert (manifest["fingerprint_fields"]["profile.w_norm"], manifest["fingerprint_fields"]["profile.w_align"]) == (
        3.0, 0.5)
    # the scores the rewrites start from are detect's under the same weights, not the profile's
    merge_run(out, tmp_path / "m.parquet")
    before = _read(tmp_path / "m.parquet")["score_before"]
    weighted = tmp_path / "weighted.parquet"
    assert runner.invoke(app, ["detect", str(prompts), "-o", str(weighted), "--model", str(tiny_model_dir),
                               "--device", "cpu", *weights]).exit_code == 0
    plain = detect(prompts, None, DetectSettings(model=str(tiny_model_dir), device="cpu")).scores["score"]
    np.testing.assert_allclose(before, _read(weighted)["score"], atol=1e-5)
    assert not np.allclose(before, plain, equal_nan=True)
    # single-file output: the flags reach it the same way
    single = tmp_path / "single.parquet"
    assert runner.invoke(app, ["mitigate", str(prompts), "-o", str(single), "--model", str(tiny_model_dir),
                               "--device", "cpu", "--target", repr(target), *weights, *SMALL_FLAGS]).exit_code == 0
    np.testing.assert_allclose(_read(single)["score_before"], _read(weighted)["score"], atol=1e-5)
    pickled = ["mitigate", str(prompts), "-o", str(tmp_path / "p.parquet"), "--target", "0",
               "--model", str(tmp_path / "model.ckpt")]
    refused = runner.invoke(app, pickled)
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr
    allowed = runner.invoke(app, [*pickled, "--allow-pickle"])  # past the refusal, to the missing file
    assert allowed.exit_code == 2 and "does not exist" in allowed.stderr and "--allow-pickle" not in allowed.stderr


def test_detect_run_shards_as_input_take_only_flagged_rows(
    tiny_model_dir: Path, prompts: Path, target: float, tmp_path: Path
) -> None:
    scores = tmp_path / "scores"
    run_detect(prompts, scores, DetectSettings(model=str(tiny_model_dir), device="cpu", id_column="id",
                                               threshold=target), RunOptions(shard_size=3))
    merge_run(scores, tmp_path / "scores.parquet")
    flagged = _read(tmp_path / "scores.parquet")
    expected_ids = flagged.loc[flagged["flagged"].fillna(False).astype(bool), "prompt_id"].tolist()
    assert 3 <= len(expected_ids) < 8
    settings = MitigateSettings(detect=DetectSettings(model=str(tiny_model_dir), device="cpu"), target=target,
                                **SMALL)
    outcome = run_mitigate(scores / "shards", tmp_path / "run", settings, RunOptions(shard_size=2))
    # planned over all 10 input rows (4 files of 3, 3, 3, 1 rows), written for the flagged ones only
    assert (outcome.summary["shards"], outcome.summary["rows_done"]) == (7, 10)
    assert outcome.summary["written"] == len(expected_ids) == outcome.summary["flagged"]
    merge_run(tmp_path / "run", tmp_path / "merged.parquet")
    mitigate(tmp_path / "scores.parquet", tmp_path / "one.parquet", settings)
    merged = _read(tmp_path / "merged.parquet")
    assert merged["prompt_id"].tolist() == expected_ids
    _same_rows(merged, _read(tmp_path / "one.parquet"))
    bare = tmp_path / "bare"
    run_detect(prompts, bare, DetectSettings(model=str(tiny_model_dir), device="cpu"), RunOptions(shard_size=10))
    with pytest.raises(UsageError, match="--all"):
        run_mitigate(bare / "shards", tmp_path / "run2", settings)


@pytest.mark.slow  # 5-9 s of CPU; detect's run-directory tests cover the same machinery by default
def test_status_merge_and_refusals(tiny_model_dir: Path, prompts: Path, target: float, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["mitigate", str(prompts), "--model", str(tiny_model_dir), "--device", "cpu", "--target", repr(target),
            *SMALL_FLAGS]
    result = runner.invoke(app, [*base, "-o", str(out), "--shard-size", "6", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    status = runner.invoke(app, ["status", str(out), "--json"])
    facts = json.loads(status.stdout)
    assert (facts["kind"], facts["shards"], facts["complete"], facts["target"]) == ("mitigate", 2, True, target)
    assert facts["rewritten"] == summary["rewritten"] and facts["flagged"] == summary["flagged"]
    table = runner.invoke(app, ["status", str(out)])
    assert table.exit_code == 0 and "rewritten" in table.stdout and "mitigate run" in table.stdout
    merged = tmp_path / "m.parquet"
    assert runner.invoke(app, ["merge", str(out), "-o", str(merged)]).exit_code == 0
    assert _read(merged)["status"].isin(["ok", "unresolved", "not_flagged", "skipped_empty"]).all()
    embeddings = runner.invoke(app, [*base, "-o", str(tmp_path / "run2"), "--emit-embeddings",
                                     str(tmp_path / "e.safetensors")])
    assert embeddings.exit_code == 2 and "run directory" in embeddings.stderr
    workers = runner.invoke(app, [*base, "-o", str(tmp_path / "x.parquet"), "--workers", "2"])
    assert workers.exit_code == 2 and "run directory" in workers.stderr
    detect_dir = tmp_path / "detected"
    assert runner.invoke(app, ["detect", str(prompts), "-o", str(detect_dir), "--model", str(tiny_model_dir),
                               "--device", "cpu"]).exit_code == 0
    mixed = runner.invoke(app, [*base, "-o", str(detect_dir)])
    assert mixed.exit_code == 2 and "`memscan detect` run" in mixed.stderr
    with pytest.raises(UsageError, match="--retry-errors"):
        run_mitigate(prompts, out, _settings(tiny_model_dir, target), RunOptions(retry_errors=True))


def test_mitigate_job_survives_the_trip_to_a_worker(tiny_model_dir: Path, target: float) -> None:
    """What worker processes and Ray actors receive: the job pickles to an equal job, on its device."""
    job = MitigateJob(_settings(tiny_model_dir, target)).on_device("cpu")
    assert pickle.loads(pickle.dumps(job)) == job


@pytest.mark.slow  # ~16 s of CPU, two spawned workers; fast coverage of the same: the process pool in
# test_run_executors.py::test_worker_processes_pull_from_a_queue, the job's pickle trip in
# test_mitigate_job_survives_the_trip_to_a_worker, its rows in test_run_directory_gives_the_single_file_rows
def test_worker_processes_write_the_same_rewrites(
    tiny_model_dir: Path, prompts: Path, target: float, single: tuple[pd.DataFrame, dict], tmp_path: Path
) -> None:
    settings = _settings(tiny_model_dir, target)
    outcome = run_mitigate(prompts, tmp_path / "run", settings, RunOptions(shard_size=3), workers=2)
    assert outcome.exit_code == 0 and outcome.summary["done"] == 4
    workers = {json.loads(p.read_text())["worker"] for p in (tmp_path / "run" / "stats").glob("*.json")}
    assert workers and describe_pid() not in workers  # written by the worker processes, not this one
    merge_run(tmp_path / "run", tmp_path / "merged.parquet")
    _same_rows(_read(tmp_path / "merged.parquet"), single[0])
