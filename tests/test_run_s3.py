"""Run directories on a bucket (`-o s3://bucket/audit/`), against a real S3 endpoint: moto's server
mode with s3fs as the client. Inputs read from the bucket, runs written to it, killed and resumed,
two starters racing on one prefix, worker processes and Ray actors sharing it, bad stores refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from _s3 import S3, denying_server, s3_bucket  # noqa: E402

from memscan import storage  # noqa: E402
from memscan.cli import app  # noqa: E402
from memscan.config import DetectSettings  # noqa: E402
from memscan.errors import EXIT_INPUT, FingerprintMismatchError  # noqa: E402
from memscan.io.scores import to_table  # noqa: E402
from memscan.run import RunDirectory, RunOptions, run_detect  # noqa: E402
from memscan.run import rundir as rundir_module  # noqa: E402
from memscan.run.job import shard_stats  # noqa: E402
from memscan.run.merge import merge_run  # noqa: E402

runner = CliRunner()
ROWS, SHARD = 120, 20  # six shards


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_bucket("runs") as bucket:
        yield bucket


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompts with a stable id column (the same ids from CSV and Parquet), a few empty."""
    texts = [f"a {('red', 'blue', 'green')[i % 3]} {('cat', 'tree')[i % 2]} by painter {i % 31}" if i % 17 else ""
             for i in range(ROWS)]
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    pd.DataFrame({"key": [f"k{i:04d}" for i in range(ROWS)], "prompt": texts}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def inputs(s3: S3, prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The prompts on the bucket as CSV and as a Parquet file of several row groups."""
    parquet = tmp_path_factory.mktemp("pq") / "prompts.parquet"
    pq.write_table(pa.Table.from_pandas(pd.read_csv(prompts, keep_default_na=False), preserve_index=False),
                   parquet, row_group_size=25)
    return {"csv": s3.put("inputs/prompts.csv", prompts.read_bytes()),
            "parquet": s3.put("inputs-pq/prompts.parquet", parquet.read_bytes())}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """An uninterrupted local run of the same prompts: what every run on the bucket must equal."""
    root = tmp_path_factory.mktemp("reference")
    run_detect(prompts, root / "run", _settings(tiny_model_dir), RunOptions(shard_size=SHARD))
    merge_run(root / "run", root / "reference.parquet")
    return pq.read_table(root / "reference.parquet").to_pandas()


def _settings(model_dir: Path, **kw: object) -> DetectSettings:
    return DetectSettings(**{"model": str(model_dir), "device": "cpu", "batch_size": 16, "id_column": "key", **kw})


def _assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert got["prompt_id"].tolist() == want["prompt_id"].tolist()  # no row lost or duplicated
    assert got["status"].tolist() == want["status"].tolist()
    np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)


def _merged(run: str, s3: S3, name: str) -> pd.DataFrame:
    """Merge on the bucket (a run read from and a file written to the store), read back."""
    merge_run(run, s3.url(f"merged/{name}.parquet"))
    return pd.read_parquet(pa.BufferReader(s3.get(f"merged/{name}.parquet")))


def _cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "memscan", *map(str, args)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_line(result: object, code: int) -> str:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.exit_code == code, result.output  # type: ignore[attr-defined]
    assert stderr.startswith("memscan: error:") and len(stderr.strip().splitlines()) == 1, stderr
    return stderr


# ------------------------------------------------------------------------- a run on a bucket


def test_run_on_a_bucket_equals_a_local_run_and_resumes(
    s3: S3, inputs: dict[str, str], tiny_model_dir: Path, reference: pd.DataFrame, tmp_path: Path
) -> None:
    run = s3.url("audit/")
    outcome = run_detect(inputs["csv"], run, _settings(tiny_model_dir), RunOptions(shard_size=SHARD))
    assert outcome.exit_code == 0 and outcome.summary["done"] == 6 and outcome.summary["complete"]
    keys = s3.keys("audit/")
    staged = [k for k in keys if k.startswith("audit/inputs/")]
    assert len(staged) == 1 and staged[0].endswith("/input-00000.parquet")  # under this starter's prefix
    assert [k for k in keys if not k.startswith("audit/inputs/")] == [
        "audit/manifest.json",
        *[f"audit/shards/part-{i:05d}.parquet" for i in range(6)],
        *[f"audit/stats/part-{i:05d}.json" for i in range(6)],
        "audit/summary.json",
    ]  # every object whole: no temporary, no lock
    manifest = json.loads(s3.get("audit/manifest.json"))
    assert manifest["inputs"][0]["path"] == inputs["csv"] and manifest["inputs"][0]["rows"] == ROWS
    _assert_same_rows(_merged(run, s3, "audit"), reference)

    status = runner.invoke(app, ["status", run, "--json"])
    assert status.exit_code == 0 and json.loads(status.stdout)["complete"] is True
    local = tmp_path / "merged.parquet"
    assert runner.invoke(app, ["merge", run, "-o", str(local)]).exit_code == 0
    _assert_same_rows(pq.read_table(local).to_pandas(), reference)
    diff = runner.invoke(app, ["diff", s3.url("merged/audit.parquet"), run, "--json"])
    assert diff.exit_code == 0, diff.output
    assert json.loads(diff.stdout)["counts"]["matched"] == ROWS

    again = run_detect(inputs["csv"], run, _settings(tiny_model_dir, batch_size=3), RunOptions(shard_size=SHARD))
    assert again.exit_code == 0 and again.summary["attempt"]["shards_processed"] == 0
    with pytest.raises(FingerprintMismatchError, match="seed"):
        run_detect(inputs["csv"], run, _settings(tiny_model_dir, seed=52), RunOptions(shard_size=SHARD))

    # --retry-errors on the bucket: only the failed rows of a shard are scored again
    directory = RunDirectory(run)
    _, shards = directory.plan()
    table = directory.read_shard(shards[0])
    frame = table.to_pandas()
    good = frame.copy()
    frame.loc[[1, 4], "status"] = "oom"
    frame.loc[[1, 4], "score"] = np.nan
    directory.write_shard(shards[0], to_table(frame, table.schema), shard_stats(frame, seconds=1.0, worker="test"))
    retried = run_detect(inputs["csv"], run, _settings(tiny_model_dir), RunOptions(shard_size=SHARD, retry_errors=True))
    assert retried.exit_code == 0 and retried.summary["attempt"]["shards_processed"] == 1
    after = directory.read_shard(shards[0]).to_pandas()
    assert after["status"].tolist() == good["status"].tolist()
    np.testing.assert_allclose(after.loc[[1, 4], "score"], good.loc[[1, 4], "score"], atol=1e-5)


def test_parquet_on_a_bucket_is_read_in_place_and_single_file_output_too(
    s3: S3, inputs: dict[str, str], tiny_model_dir: Path, reference: pd.DataFrame
) -> None:
    run = s3.url("audit-pq/")
    result = runner.invoke(app, ["detect", inputs["parquet"], "-o", run, "--model", str(tiny_model_dir),
                                 "--device", "cpu", "--batch-size", "16", "--id-column", "key",
                                 "--shard-size", str(SHARD)])
    assert result.exit_code == 0, result.output
    manifest = json.loads(s3.get("audit-pq/manifest.json"))
    assert manifest["inputs"][0]["staged"] is None and not s3.keys("audit-pq/inputs/")
    _assert_same_rows(_merged(run, s3, "audit-pq"), reference)
    single = runner.invoke(app, ["detect", inputs["csv"], "-o", s3.url("single/scores.parquet"), "--model",
                                 str(tiny_model_dir), "--device", "cpu", "--batch-size", "16", "--id-column", "key"])
    assert single.exit_code == 0, single.output
    _assert_same_rows(pd.read_parquet(pa.BufferReader(s3.get("single/scores.parquet"))), reference)


def test_a_run_directory_in_memory_equals_the_local_run(
    prompts: Path, tiny_model_dir: Path, reference: pd.DataFrame
) -> None:
    """memory:// (fsspec's in-process store: no rename, no locks, like a bucket) holds a run too."""
    run = "memory://memscan-runs/audit/"
    outcome = run_detect(prompts, run, _settings(tiny_model_dir), RunOptions(shard_size=SHARD))
    assert outcome.exit_code == 0 and outcome.summary["done"] == 6
    merge_run(run, "memory://memscan-runs/merged.parquet")
    merged = pd.read_parquet(pa.BufferReader(storage.RemotePath("memory://memscan-runs/merged.parquet").read_bytes()))
    _assert_same_rows(merged, reference)
    again = run_detect(prompts, run, _settings(tiny_model_dir), RunOptions(shard_size=SHARD))
    assert again.summary["attempt"]["shards_processed"] == 0


@pytest.mark.slow  # a subprocess that imports torch and is killed: 31 s on two busy cores
def test_sigkill_mid_run_on_a_bucket_then_rerun_equals_uninterrupted(
    s3: S3, inputs: dict[str, str], tiny_model_dir: Path, reference: pd.DataFrame
) -> None:
    run, shard_size = s3.url("killed/"), 4  # 30 shards, so the run is still going when killed
    proc = _cli("detect", inputs["csv"], "-o", run, "--model", tiny_model_dir, "--shard-size", str(shard_size),
                "--batch-size", "1", "--device", "cpu", "--id-column", "key")
    deadline = time.monotonic() + 240
    while len([k for k in s3.keys("killed/stats/")]) < 3:
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.returncode} {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("run made no progress")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(s3.keys("killed/stats/"))
    assert done_before < ROWS // shard_size, "the run finished before it was killed"
    shards_before = set(s3.keys("killed/shards/"))
    outcome = run_detect(inputs["csv"], run, _settings(tiny_model_dir, batch_size=1), RunOptions(shard_size=shard_size))
    assert outcome.exit_code == 0
    assert outcome.summary["attempt"]["shards_processed"] == ROWS // shard_size - done_before
    assert shards_before <= set(s3.keys("killed/shards/"))  # nothing finished was lost
    _assert_same_rows(_merged(run, s3, "killed"), reference)


@pytest.mark.slow  # two subprocesses that import torch: 43 s on two busy cores
def test_two_starters_race_on_an_empty_prefix_and_share_the_run(
    s3: S3, inputs: dict[str, str], tiny_model_dir: Path, reference: pd.DataFrame
) -> None:
    run = s3.url("ranks/")
    args = ("detect", inputs["csv"], "-o", run, "--model", tiny_model_dir, "--shard-size", str(SHARD),
            "--batch-size", "16", "--device", "cpu", "--id-column", "key")
    procs = [_cli(*args, env={"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in (0, 1)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    workers = {json.loads(s3.get(k))["worker"] for k in s3.keys("ranks/stats/")}
    assert len(s3.keys("ranks/stats/")) == 6 and len(workers) == 2
    assert len(s3.keys("ranks/inputs/")) == 1  # the loser of the manifest race removed its staged copy
    _assert_same_rows(_merged(run, s3, "ranks"), reference)


@pytest.mark.slow  # two spawned worker processes import torch: 43 s on two busy cores
def test_worker_processes_share_a_bucket_run_directory(
    s3: S3, inputs: dict[str, str], tiny_model_dir: Path, reference: pd.DataFrame
) -> None:
    run = s3.url("pool/")
    outcome = run_detect(inputs["csv"], run, _settings(tiny_model_dir), RunOptions(shard_size=SHARD), workers=2)
    assert outcome.exit_code == 0 and outcome.summary["done"] == 6
    _assert_same_rows(_merged(run, s3, "pool"), reference)


# ------------------------------------------------------------------------- the manifest race


def _manifest(fingerprint: str, writer: str, seed: int) -> dict[str, object]:
    staged = f"inputs/{writer}/input-00000.parquet"
    return {"kind": "detect", "fingerprint": fingerprint, "fingerprint_fields": {"seed": seed, "model": "m"},
            "inputs": [{"path": "s3://b/p.csv", "rows": 3, "size": 9, "staged": staged}],
            "shards": [[0, 0, 0, 3]], "rows": 3}


def _stage(directory: RunDirectory, writer: str) -> None:
    (directory.root / f"inputs/{writer}/input-00000.parquet").write_bytes(b"staged")


def test_manifest_race_with_a_conditional_write(s3: S3) -> None:
    first, second, other = (RunDirectory(s3.url("race-atomic/")) for _ in range(3))
    for directory, name in ((first, "w1"), (second, "w2"), (other, "w3")):
        _stage(directory, name)
    assert first.write_manifest(_manifest("aaa", "w1", 51))["fingerprint"] == "aaa"
    adopted = second.write_manifest(_manifest("aaa", "w2", 51))  # same settings: the winner's plan
    assert adopted["inputs"][0]["staged"] == "inputs/w1/input-00000.parquet"
    with pytest.raises(FingerprintMismatchError, match=r"at the same time with different settings \(seed\)"):
        other.write_manifest(_manifest("bbb", "w3", 52))
    assert s3.keys("race-atomic/inputs/") == ["race-atomic/inputs/w1/input-00000.parquet"]
    assert json.loads(s3.get("race-atomic/manifest.json"))["inputs"][0]["staged"].startswith("inputs/w1/")


@pytest.mark.parametrize("fingerprints", [("aaa", "aaa"), ("bbb", "aaa")])
def test_manifest_race_without_a_conditional_write_settles_on_the_smallest_claim(
    s3: S3, monkeypatch: pytest.MonkeyPatch, fingerprints: tuple[str, str]
) -> None:
    """Stores without If-None-Match: both starters claim, wait, and the smaller (fingerprint, writer) wins."""
    monkeypatch.setattr(storage, "ATOMIC_CREATE", frozenset())
    monkeypatch.setattr(rundir_module, "CLAIM_SETTLE_S", 0.5)
    prefix = f"race-claims-{'-'.join(fingerprints)}/"
    starters = [RunDirectory(s3.url(prefix)) for _ in fingerprints]
    outcomes: dict[int, object] = {}

    def start(i: int) -> None:
        _stage(starters[i], starters[i].writer)
        try:
            seed = 51 + ord(fingerprints[i][0])
            outcomes[i] = starters[i].write_manifest(_manifest(fingerprints[i], starters[i].writer, seed))
        except FingerprintMismatchError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winner = min(range(2), key=lambda i: (fingerprints[i], starters[i].writer))
    in_force = json.loads(s3.get(f"{prefix}manifest.json"))
    assert in_force["inputs"][0]["staged"] == f"inputs/{starters[winner].writer}/input-00000.parquet"
    assert outcomes[winner] == in_force
    loser = 1 - winner
    if fingerprints[0] == fingerprints[1]:
        assert outcomes[loser] == in_force  # adopted
    else:
        assert isinstance(outcomes[loser], FingerprintMismatchError)
    assert s3.keys(f"{prefix}inputs/") == [f"{prefix}inputs/{starters[winner].writer}/input-00000.parquet"]
    assert len(s3.keys(f"{prefix}claims/")) == 2


# ------------------------------------------------------------------------- bad stores


def test_bad_stores_are_one_line_exit_4_and_lose_nothing(
    s3: S3, inputs: dict[str, str], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.ENV_OPTIONS, os.environ[storage.ENV_OPTIONS])  # undo --storage-option after
    run = s3.url("kept/")
    assert run_detect(inputs["csv"], run, _settings(tiny_model_dir), RunOptions(shard_size=SHARD)).exit_code == 0
    kept = {k: s3.get(k) for k in s3.keys("kept/")}
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--id-column", "key", "--shard-size", str(SHARD)]
    unreachable = ["--storage-option", "s3.endpoint_url=http://127.0.0.1:1"]
    line = _one_line(runner.invoke(app, ["status", run, *unreachable]), EXIT_INPUT)
    assert "cannot reach the store" in line
    line = _one_line(runner.invoke(app, ["detect", inputs["csv"], "-o", run, *model, *unreachable]), EXIT_INPUT)
    assert "cannot reach the store" in line
    good = ["--storage-option", f"s3.endpoint_url={s3.endpoint}"]
    result = runner.invoke(app, ["detect", inputs["csv"], "-o", "s3://no-such-bucket-memscan/audit/", *model, *good])
    line = _one_line(result, EXIT_INPUT)
    assert "cannot write run directory s3://no-such-bucket-memscan/audit: not found" in line
    assert "model loaded" not in result.stderr
    with denying_server() as endpoint:
        denied = ["--storage-option", f"s3.endpoint_url={endpoint}"]
        assert "permission denied" in _one_line(runner.invoke(app, ["status", run, *denied]), EXIT_INPUT)
        result = runner.invoke(app, ["detect", inputs["csv"], "-o", run, *model, *denied])
        assert "permission denied" in _one_line(result, EXIT_INPUT)
        result = runner.invoke(app, ["merge", run, "-o", s3.url("kept-merged.parquet"), *denied])
        assert "permission denied" in _one_line(result, EXIT_INPUT)
    assert {k: s3.get(k) for k in s3.keys("kept/")} == kept  # every finished object is still there, unchanged


# ------------------------------------------------------------------------- the README's nightly audit

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _blocks(section: str, language: str) -> list[str]:
    parts = section.split(f"```{language}\n")[1:]
    return [part.split("```", 1)[0] for part in parts]


def _argv(command: str, subs: dict[str, str], *, today: str = "2026-11-30", yesterday: str = "2026-11-29") -> list[str]:
    """The argv `memscan` gets from one README command, as bash expands it (cron's \\% included), with
    `chronic` passing through, `date` answering for the given night, and `subs` applied first."""
    for old, new in subs.items():
        command = command.replace(old, new)
    prelude = (
        'chronic() { "$@"; }; memscan() { printf "%s\\0" memscan "$@"; }; '
        f'date() {{ case "$*" in *yesterday*) echo {yesterday};; *) echo {today};; esac; }}; '
    )
    out = subprocess.run(["bash", "-c", prelude + command], capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


@pytest.fixture(scope="module")
def captions(s3: S3, prompts: Path) -> pd.DataFrame:
    """The README's data: Parquet with `key` and `caption` columns."""
    return pd.read_csv(prompts, keep_default_na=False).rename(columns={"prompt": "caption"})


def _put_parquet(s3: S3, key: str, frame: pd.DataFrame) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    s3.put(key, sink.getvalue().to_pybytes())


def test_the_readme_nightly_crontab_line_mails_only_news(
    s3: S3, captions: pd.DataFrame, tiny_model_dir: Path, reference: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(storage.ENV_OPTIONS, os.environ[storage.ENV_OPTIONS])
    [cron] = _blocks(_section("Nightly audits"), "cron")
    lines = [row.split(None, 5)[5] for row in cron.splitlines() if row and not row.startswith("#")]
    command, others = lines[0], lines[1:]  # the nightly audit; then any upkeep lines (after the five fields)
    scores = np.sort(reference.loc[reference["status"] == "ok", "score"].to_numpy())
    threshold = float((scores[len(scores) // 2] + scores[len(scores) // 2 + 1]) / 2)  # between two scores
    root = s3.url("nightly/")
    subs = {"s3://data/": f"{root}data/", "s3://audits/": f"{root}audits/",
            "--model sd-v1-4": f"--model {tiny_model_dir} --device cpu --batch-size 16 --shard-size 40 "
                               f"--threshold {threshold!r}"}
    _put_parquet(s3, "nightly/data/captions/part-0.parquet", captions.iloc[:80])
    first = _argv(command, subs, today="2026-11-29")
    previous = first.index("--previous")
    first = first[:previous] + first[previous + 2:]
    first.remove("--fail-on-new-flagged")  # the first night, as the README says
    assert first[0] == "memscan"
    night1 = runner.invoke(app, first[1:])
    assert night1.exit_code == 0, night1.output

    _put_parquet(s3, "nightly/data/captions/part-1.parquet", captions.iloc[80:])  # the data grew
    night2 = runner.invoke(app, _argv(command, subs)[1:])
    added = reference.set_index("prompt_id").loc[[f"k{i:04d}" for i in range(80, ROWS)]]
    newly = int((added["score"] > threshold).sum())
    assert newly > 0 and night2.exit_code == 10, night2.output  # news: cron mails
    summary = json.loads(s3.get("nightly/audits/memscan/2026-11-30/summary.json"))
    assert summary["changes"]["newly_flagged"] == newly and summary["changes"]["added"] == ROWS - 80

    night3 = runner.invoke(app, _argv(command, subs, today="2026-12-01", yesterday="2026-11-30")[1:])
    assert night3.exit_code == 0, night3.output  # the same flags as last night: silence
    changes = json.loads(s3.get("nightly/audits/memscan/2026-12-01/summary.json"))["changes"]
    assert changes["newly_flagged"] == 0 and changes["still_flagged"] == summary["flagged"]
    for other in others:  # e.g. the weekly cache upkeep
        result = runner.invoke(app, _argv(other, subs)[1:])
        assert result.exit_code == 0, (other, result.output)


@pytest.mark.slow  # Ray starts a local cluster: 38 s
def test_the_readme_ray_on_a_bucket_recipe_needs_no_shared_filesystem(
    s3: S3, captions: pd.DataFrame, tiny_model_dir: Path, reference: pd.DataFrame
) -> None:
    ray = pytest.importorskip("ray")
    [recipe] = _blocks(_section("Nightly audits"), "bash")
    commands = [row for row in recipe.splitlines() if row.strip() and not row.startswith("pip install")]
    assert len(commands) == 3
    root = s3.url("ray-recipe/")
    _put_parquet(s3, "ray-recipe/data/captions/part-0.parquet", captions)
    subs = {"s3://data/": f"{root}data/", "s3://audits/": f"{root}audits/", "--workers 16": "--workers 2",
            "--model sd-v1-4": f"--model {tiny_model_dir} --device cpu --batch-size 16 --shard-size 40"}
    try:
        for command in commands:
            result = runner.invoke(app, _argv(command, subs)[1:])
            assert result.exit_code == 0, result.output
    finally:
        ray.shutdown()
    stats = s3.keys("ray-recipe/audits/memscan/2026-11-30/stats/")
    assert len(stats) == 3 and len({json.loads(s3.get(k))["worker"] for k in stats}) == 2  # two actors
    merged = pd.read_parquet(pa.BufferReader(s3.get("ray-recipe/audits/memscan/2026-11-30.parquet")))
    _assert_same_rows(merged, reference)
