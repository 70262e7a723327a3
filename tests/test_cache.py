"""Score cache (detect --cache): exact reuse, only new prompts scored, fingerprint misses, concurrent
appends and compaction, info, corrupt segments, run directories and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_scoring_model
from typer.testing import CliRunner

from memscan.cache import CacheError, ScoreCache
from memscan.cli import app
from memscan.config import DetectSettings
from memscan.detect import detect
from memscan.models.loading import ScoringModel
from memscan.run import RunOptions, run_detect
from memscan.run.merge import merge_run
from memscan.scorer import Scorer

runner = CliRunner()
NUMBERS = ["norm", "alignment", "score"]
EXACT = [*NUMBERS, "truncated", "status", "prompt_id"]


def _prompts(path: Path, count: int, *, start: int = 0, empty_every: int = 0) -> Path:
    texts = [f"a photo of object {i} in style {i % 7}" for i in range(start, start + count)]
    if empty_every:
        texts = ["" if i % empty_every == 0 else t for i, t in enumerate(texts)]
    pd.DataFrame({"id": [f"p{i}" for i in range(start, start + count)], "prompt": texts}).to_csv(path, index=False)
    return path


@pytest.fixture
def scored_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Prompts the UNet scored (one entry per batch: its size), counted at Scorer._score_batch."""
    calls: list[int] = []
    original = Scorer._score_batch

    def counting(self: Scorer, tokens, rows, state, upcoming=None):  # type: ignore[no-untyped-def]
        calls.append(len(rows))
        return original(self, tokens, rows, state, upcoming)

    monkeypatch.setattr(Scorer, "_score_batch", counting)
    return calls


def _run(path: Path, out: Path, model: ScoringModel, cache: Path | str, **kw: object):  # type: ignore[no-untyped-def]
    settings = DetectSettings(**{"batch_size": 4, "id_column": "id", "cache": str(cache), **kw})
    return detect(path, out, settings, model=model)


def test_second_run_reuses_every_row_exactly_and_scores_none(
    tiny_model: ScoringModel, tmp_path: Path, scored_rows: list[int]
) -> None:
    prompts = _prompts(tmp_path / "p.csv", 12, empty_every=5)
    first = _run(prompts, tmp_path / "1.parquet", tiny_model, tmp_path / "cache")
    assert first.summary["cache"]["reused"] == 0 and first.summary["cache"]["scored"] == 9
    assert sum(scored_rows) == 9
    scored_rows.clear()
    second = _run(prompts, tmp_path / "2.parquet", tiny_model, tmp_path / "cache", batch_size=3)
    assert sum(scored_rows) == 0  # not one prompt through the UNet
    assert second.summary["cache"]["reused"] == 9 and second.summary["cache"]["scored"] == 0
    assert second.summary["cache"]["segment"] is None  # nothing new to store
    a, b = pq.read_table(tmp_path / "1.parquet").to_pandas(), pq.read_table(tmp_path / "2.parquet").to_pandas()
    for column in EXACT:  # bitwise: the stored float32 numbers, not a rescoring
        assert a[column].equals(b[column]), column
    # and a reused row equals a fresh scoring (no cache, another batch size) within detect's tolerance
    fresh = detect(prompts, None, DetectSettings(batch_size=5, id_column="id"), model=tiny_model).scores
    ok = fresh["status"] == "ok"
    for column in NUMBERS:
        np.testing.assert_allclose(b.loc[ok, column], fresh.loc[ok, column], rtol=0, atol=1e-5)


def test_grown_input_scores_only_the_new_prompts(
    tiny_model: ScoringModel, tmp_path: Path, scored_rows: list[int]
) -> None:
    cache = tmp_path / "cache"
    old = _run(_prompts(tmp_path / "old.csv", 20), tmp_path / "old.parquet", tiny_model, cache).scores
    scored_rows.clear()
    grown = tmp_path / "grown.csv"
    frame = pd.concat([pd.read_csv(_prompts(tmp_path / "new.csv", 5, start=20)), pd.read_csv(tmp_path / "old.csv")])
    frame.sample(frac=1.0, random_state=0).to_csv(grown, index=False)  # new rows mixed in, order changed
    result = _run(grown, tmp_path / "grown.parquet", tiny_model, cache)
    assert sum(scored_rows) == 5
    assert (result.summary["cache"]["reused"], result.summary["cache"]["scored"]) == (20, 5)
    by_id = result.scores.set_index("prompt_id")
    before = old.set_index("prompt_id")
    for column in NUMBERS:
        assert by_id.loc[before.index, column].equals(before[column]), column
    assert ScoreCache(cache).info()["rows"] == 25  # 20 + the 5 new, in two segments
    assert ScoreCache(cache).info()["segments"] == 2


def test_changed_settings_and_models_miss_the_cache_but_the_threshold_does_not(
    tiny_model: ScoringModel, tmp_path: Path
) -> None:
    prompts = _prompts(tmp_path / "p.csv", 6)
    cache = tmp_path / "cache"
    base = _run(prompts, tmp_path / "a.parquet", tiny_model, cache)
    assert base.summary["cache"]["scored"] == 6
    misses = {
        "n_noise": dict(n_noise=2), "seed": dict(seed=3), "weights": dict(w_norm=0.5), "method": dict(method="norm"),
    }
    for name, change in misses.items():
        result = _run(prompts, tmp_path / f"{name}.parquet", tiny_model, cache, **change)
        assert result.summary["cache"]["reused"] == 0, name
    # a new model under the same profile name and source ("tiny"): other weights, new fingerprint
    upgraded = tiny_scoring_model("epsilon", seed=5)
    assert (upgraded.profile.name, upgraded.source) == (tiny_model.profile.name, tiny_model.source)
    result = _run(prompts, tmp_path / "upgraded.parquet", upgraded, cache)
    assert result.summary["cache"]["reused"] == 0
    assert len(ScoreCache(cache).info()["fingerprints"]) == 6
    # the threshold only sets the flag: same fingerprint, flag recomputed from this run's threshold
    median = float(np.median(base.scores["score"]))
    flagged = _run(prompts, tmp_path / "t.parquet", tiny_model, cache, threshold=median)
    assert flagged.summary["cache"]["reused"] == 6
    assert flagged.scores["flagged"].tolist() == (base.scores["score"] > median).tolist()


def _concurrent_audits(tmp_path: Path, cache: Path | str) -> tuple[dict[str, Any], list[ScoringModel]]:
    """Two runs started together on one cache (a.csv: 16 prompts; b.csv: half of a's and 8 more),
    on two model objects with the same weights (one fingerprint); their results by name, the models."""
    _prompts(tmp_path / "a.csv", 16)
    pd.concat([pd.read_csv(tmp_path / "a.csv").iloc[8:], pd.read_csv(_prompts(tmp_path / "x.csv", 8, start=16))]
              ).to_csv(tmp_path / "b.csv", index=False)
    models = [tiny_scoring_model("epsilon"), tiny_scoring_model("epsilon")]
    start, results, errors = threading.Barrier(2), {}, []

    def audit(name: str, model: ScoringModel) -> None:
        try:
            start.wait()
            results[name] = _run(tmp_path / f"{name}.csv", tmp_path / f"{name}.parquet", model, cache)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=audit, args=pair) for pair in zip("ab", models, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    return results, models


def test_concurrent_runs_share_one_cache_and_compact_keeps_every_key_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _, models = _concurrent_audits(tmp_path, cache)
    before = ScoreCache(cache).info()
    assert len(before["fingerprints"]) == 1 and before["segments"] == 2 and 24 <= before["rows"] <= 32
    result = ScoreCache(cache).compact()
    assert (result["segments_before"], result["segments_after"], result["rows_after"]) == (2, 1, 24)
    [segment] = list((cache / before["fingerprints"][0]["fingerprint"]).glob("seg-*.parquet"))
    keys = pq.read_table(segment).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 24
    again = _run(tmp_path / "b.csv", tmp_path / "b2.parquet", models[0], cache)
    assert again.summary["cache"]["reused"] == 16  # every prompt of b, from the one compacted segment
    np.testing.assert_allclose(again.scores["score"], pd.read_parquet(tmp_path / "b.parquet")["score"], atol=1e-5)


def test_compact_leaves_segments_written_meanwhile_and_readers_list_again(
    tiny_model: ScoringModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    _run(_prompts(tmp_path / "a.csv", 4), tmp_path / "a.parquet", tiny_model, cache)
    _run(_prompts(tmp_path / "b.csv", 4, start=4), tmp_path / "b.parquet", tiny_model, cache)
    store = ScoreCache(cache)
    read = ScoreCache._read_segments

    def with_a_writer(self: ScoreCache, paths: list[str]):  # type: ignore[no-untyped-def]
        tables = read(self, paths)
        if self is store:  # a run stores a segment while compact merges the two it listed
            _run(_prompts(tmp_path / "c.csv", 4, start=8), tmp_path / "c.parquet", tiny_model, cache)
        return tables

    monkeypatch.setattr(ScoreCache, "_read_segments", with_a_writer)
    result = store.compact()
    monkeypatch.undo()
    assert (result["segments_before"], result["segments_after"], result["rows_after"]) == (2, 2, 12)
    # a reader that listed the segments before the compact deleted them lists again
    stale = [(str(cache / "gone" / "seg-20000101T000000000000Z-000000000000.parquet"), 10)]
    listing = ScoreCache.segments
    calls = []

    def stale_first(self: ScoreCache, fingerprint: str):  # type: ignore[no-untyped-def]
        calls.append(fingerprint)
        return stale if len(calls) == 1 else listing(self, fingerprint)

    monkeypatch.setattr(ScoreCache, "segments", stale_first)
    again = _run(_prompts(tmp_path / "all.csv", 12), tmp_path / "all.parquet", tiny_model, cache)
    assert len(calls) == 2 and again.summary["cache"]["reused"] == 12


def test_info_counts_and_cli(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts(tmp_path / "p.csv", 10, empty_every=4)
    cache = tmp_path / "cache"
    args = ["detect", str(prompts), "--model", str(tiny_model_dir), "--id-column", "id", "--batch-size", "4",
            "--cache", str(cache), "--json", "--top", "0"]
    first = runner.invoke(app, [*args, "-o", str(tmp_path / "1.parquet")])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["cache"]["scored"] == 7
    assert "cache: 0 rows reused, 7 scored" in first.stderr.splitlines()[-1]
    second = runner.invoke(app, [*args, "-o", str(tmp_path / "2.parquet")])
    summary = json.loads(second.stdout)["cache"]
    assert (summary["reused"], summary["scored"]) == (7, 0)
    assert "cache: 7 rows reused, 0 scored" in second.stderr.splitlines()[-1]
    info = json.loads(runner.invoke(app, ["cache", "info", str(cache), "--json"]).stdout)
    files = list(cache.rglob("seg-*.parquet"))
    assert (info["rows"], info["segments"], len(info["fingerprints"])) == (7, 1, 1)
    assert info["bytes"] == sum(f.stat().st_size for f in files)
    entry = info["fingerprints"][0]
    assert entry["fingerprint"] == summary["fingerprint"] == files[0].parent.name
    assert (entry["method"], entry["n_noise"], entry["seed"], entry["dtype"]) == ("anisotropy", 1, 51, "float32")
    text = runner.invoke(app, ["cache", "info", str(cache)])
    assert text.exit_code == 0 and "7 rows in 1 segments" in text.stdout
    compact = runner.invoke(app, ["cache", "compact", str(cache)])
    assert compact.exit_code == 0 and "1 segments -> 1" in compact.stderr
    missing = runner.invoke(app, ["cache", "info", str(tmp_path / "nothing")])
    assert missing.exit_code == 4 and missing.stderr.count("\n") == 1 and "no cache at" in missing.stderr


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_segment_is_one_line_exit_4_before_any_scoring(
    damage: str, tiny_model_dir: Path, tmp_path: Path, scored_rows: list[int]
) -> None:
    prompts = _prompts(tmp_path / "p.csv", 6)
    cache = tmp_path / "cache"
    args = ["detect", str(prompts), "--model", str(tiny_model_dir), "--cache", str(cache), "--batch-size", "4"]
    assert runner.invoke(app, [*args, "-o", str(tmp_path / "1.parquet")]).exit_code == 0
    [segment] = list(cache.rglob("seg-*.parquet"))
    bad = segment.parent / "seg-29990101T000000000000Z-badbadbadbad.parquet"
    half = segment.read_bytes()[: segment.stat().st_size // 2]
    bad.write_bytes(b"not parquet at all" if damage == "garbage" else half)
    scored_rows.clear()
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "2.parquet")])
    assert result.exit_code == 4, result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("memscan: error")]
    assert str(bad) in line and "corrupt" in line and "delete it" in line and "Traceback" not in result.output
    assert sum(scored_rows) == 0 and not (tmp_path / "2.parquet").exists()
    assert segment.exists()  # the good segment is untouched
    with pytest.raises(CacheError, match="corrupt") as caught:
        ScoreCache(cache).info()
    assert caught.value.exit_code == 4
    bad.unlink()
    assert runner.invoke(app, [*args, "-o", str(tmp_path / "2.parquet")]).exit_code == 0
    assert sum(scored_rows) == 0


def test_unusable_cache_location_is_refused_before_the_model_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts(tmp_path / "p.csv", 3)
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(app, ["detect", str(prompts), "--model", "no-such-model", "--cache",
                                 str(tmp_path / "afile"), "-o", str(tmp_path / "o.parquet")])
    assert result.exit_code == 4 and "is a file, not a folder" in result.stderr  # not the model error (2)


def test_run_directory_with_cache(tiny_model_dir: Path, tmp_path: Path, scored_rows: list[int]) -> None:
    prompts = _prompts(tmp_path / "p.csv", 30, empty_every=7)
    cache = tmp_path / "cache"
    settings = DetectSettings(model=str(tiny_model_dir), batch_size=4, device="cpu", id_column="id", cache=str(cache))
    first = run_detect(prompts, tmp_path / "run1", settings, RunOptions(shard_size=10), interactive=False)
    assert first.exit_code == 0 and first.summary["cache"] == {"reused": 0, "scored": 25, "shards": 3}
    assert ScoreCache(cache).info()["segments"] == 3  # one segment per shard
    scored_rows.clear()
    second = run_detect(prompts, tmp_path / "run2", settings, RunOptions(shard_size=15), interactive=False)
    assert sum(scored_rows) == 0 and second.summary["cache"] == {"reused": 25, "scored": 0, "shards": 2}
    for run in ("run1", "run2"):
        merge_run(tmp_path / run, tmp_path / f"{run}.parquet")
    a, b = pd.read_parquet(tmp_path / "run1.parquet"), pd.read_parquet(tmp_path / "run2.parquet")
    for column in EXACT:
        assert a[column].equals(b[column]), column
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["cache"]["reused"] == 25
    line = runner.invoke(app, ["detect", str(prompts), "-o", str(tmp_path / "run2"), "--model", str(tiny_model_dir),
                               "--id-column", "id", "--shard-size", "15", "--batch-size", "4", "--cache", str(cache)])
    assert line.exit_code == 0 and "cache: 25 rows reused, 0 scored" in line.stderr.splitlines()[-1]


def test_memory_url_cache(tiny_model: ScoringModel, tmp_path: Path, scored_rows: list[int]) -> None:
    url = "memory://memscan-test-cache/nightly"
    prompts = _prompts(tmp_path / "p.csv", 5)
    first = _run(prompts, tmp_path / "1.parquet", tiny_model, url)
    assert first.summary["cache"]["segment"].startswith("memory://memscan-test-cache/nightly/")
    scored_rows.clear()
    second = _run(prompts, tmp_path / "2.parquet", tiny_model, url)
    assert sum(scored_rows) == 0 and second.summary["cache"]["reused"] == 5
    assert ScoreCache(url).info()["rows"] == 5


# ------------------------------------------------------------------------- on a real S3 endpoint


@pytest.fixture(scope="module")
def s3():  # type: ignore[no-untyped-def]
    """A bucket on moto's S3 server (memscan reaches it through MEMSCAN_STORAGE_OPTIONS)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from _s3 import s3_bucket

    with s3_bucket("cache") as bucket:
        yield bucket


def test_two_concurrent_runs_share_a_cache_on_s3(s3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cache = s3.url("team/memscan-cache/")
    results, models = _concurrent_audits(tmp_path, cache)
    assert results["a"].summary["cache"]["segment"].startswith(cache)
    result = ScoreCache(cache).compact()
    assert (result["segments_before"], result["segments_after"], result["rows_after"]) == (2, 1, 24)
    [key] = [k for k in s3.keys("team/memscan-cache/") if k.rsplit("/", 1)[-1].startswith("seg-")]
    keys = pq.read_table(pa.BufferReader(s3.get(key))).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 24  # every key exactly once
    again = _run(tmp_path / "a.csv", tmp_path / "a2.parquet", models[0], cache)
    assert again.summary["cache"]["reused"] == 16 and again.summary["cache"]["scored"] == 0
    info = runner.invoke(app, ["cache", "info", cache, "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["rows"] == 24


def test_bad_cache_stores_on_s3_are_one_line_exit_4_and_lose_nothing(
    s3, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scored_rows: list[int]
) -> None:  # type: ignore[no-untyped-def]
    prompts = _prompts(tmp_path / "p.csv", 4)
    cache = s3.url("bad/cache/")
    args = ["detect", str(prompts), "--model", str(tiny_model_dir), "--batch-size", "4"]
    assert runner.invoke(app, [*args, "-o", str(tmp_path / "1.parquet"), "--cache", cache]).exit_code == 0
    kept = {k: s3.get(k) for k in s3.keys("bad/cache/")}

    def one_line(result, *, loaded: bool = False) -> str:  # type: ignore[no-untyped-def]
        """The error line; before the model loads it is all there is, after it the progress lines precede it."""
        assert result.exit_code == 4, result.output
        lines = result.stderr.strip().splitlines()
        assert ("model loaded" in result.stderr) == loaded, result.stderr
        assert len(lines) == (3 if loaded else 1) and lines[-1].startswith("memscan: error:"), result.stderr
        return lines[-1]

    missing = runner.invoke(app, [*args, "-o", str(tmp_path / "2.parquet"), "--cache", "s3://no-such-bucket-memscan/c/"])
    assert "no bucket or container 'no-such-bucket-memscan'" in one_line(missing)
    [segment] = [k for k in kept if k.rsplit("/", 1)[-1].startswith("seg-")]
    bad = segment.rsplit("/", 1)[0] + "/seg-29990101T000000000000Z-badbadbadbad.parquet"
    s3.put(bad, b"PAR1 this is not parquet")
    scored_rows.clear()
    corrupt = runner.invoke(app, [*args, "-o", str(tmp_path / "3.parquet"), "--cache", cache])
    assert f"{s3.url(bad)} is corrupt" in one_line(corrupt, loaded=True) and sum(scored_rows) == 0
    s3.fs.rm_file(f"{s3.bucket}/{bad}")
    options = json.loads(os.environ["MEMSCAN_STORAGE_OPTIONS"])
    monkeypatch.setenv("MEMSCAN_STORAGE_OPTIONS", json.dumps({**options, "s3.endpoint_url": "http://127.0.0.1:1"}))
    unreachable = runner.invoke(app, [*args, "-o", str(tmp_path / "4.parquet"), "--cache", cache])
    assert "cannot reach the store" in one_line(unreachable)
    assert not any((tmp_path / f"{n}.parquet").exists() for n in (2, 3, 4))
    assert {k: s3.get(k) for k in s3.keys("bad/cache/")} == kept  # nothing the cache held is lost


README = Path(__file__).resolve().parents[1] / "README.md"


def _nightly_cron() -> list[str]:
    """The commands of the README's "Nightly audits" crontab (after the five schedule fields)."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Nightly audits\n")
    block = text[start:text.find("\n## ", start + 1)].split("```cron\n")[1].split("```", 1)[0]
    return [row.split(None, 5)[5] for row in block.splitlines() if row and not row.startswith("#")]


def _argv(command: str, subs: dict[str, str], today: str, yesterday: str) -> list[str]:
    """memscan's argv for one crontab command as bash expands it (\\% included): `chronic` passes
    through, `date` answers for the night."""
    for old, new in subs.items():
        command = command.replace(old, new)
    prelude = ('chronic() { "$@"; }; memscan() { printf "%s\\0" "$@"; }; '
               f'date() {{ case "$*" in *yesterday*) echo {yesterday};; *) echo {today};; esac; }}; ')
    out = subprocess.run(["bash", "-c", prelude + command], capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def test_the_readme_nightly_crontab_reuses_the_cache_and_compacts_it(
    s3, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEMSCAN_STORAGE_OPTIONS", os.environ["MEMSCAN_STORAGE_OPTIONS"])
    detect_line, compact_line = _nightly_cron()
    assert "--cache" in detect_line and compact_line.startswith("chronic memscan cache compact")
    root = s3.url("readme/")
    subs = {"s3://data/": f"{root}data/", "s3://audits/": f"{root}audits/",
            "--model sd-v1-4": f"--model {tiny_model_dir} --device cpu --batch-size 16 --shard-size 20"}
    texts = [f"a {('red', 'blue')[i % 2]} kite over hill {i}" if i % 9 else "" for i in range(60)]
    captions = pd.DataFrame({"key": [f"k{i:03d}" for i in range(60)], "caption": texts})

    def put(name: str, frame: pd.DataFrame) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
        s3.put(f"readme/data/captions/{name}", sink.getvalue().to_pybytes())

    put("part-0.parquet", captions.iloc[:40])
    first = _argv(detect_line, subs, "2026-11-29", "2026-11-28")
    at = first.index("--previous")
    first = [a for a in first[:at] + first[at + 2:] if a != "--fail-on-new-flagged"]  # the first night
    assert first[0] == "detect" and runner.invoke(app, first).exit_code == 0
    put("part-1.parquet", captions.iloc[40:])  # the data grew
    night2 = runner.invoke(app, _argv(detect_line, subs, "2026-11-30", "2026-11-29"))
    assert night2.exit_code == 0, night2.output
    nights = [json.loads(s3.get(f"readme/audits/memscan/{d}/summary.json")) for d in ("2026-11-29", "2026-11-30")]
    old_ok = sum(1 for t in texts[:40] if t)
    assert nights[0]["cache"] == {"reused": 0, "scored": old_ok, "shards": 2}
    assert nights[1]["cache"] == {"reused": old_ok, "scored": sum(1 for t in texts[40:] if t), "shards": 3}
    assert "cache: 35 rows reused, 18 scored" in night2.stderr
    compact = runner.invoke(app, _argv(compact_line, subs, "2026-11-30", "2026-11-29"))
    assert compact.exit_code == 0, compact.output
    info = ScoreCache(f"{root}audits/memscan-cache/").info()
    assert (info["segments"], info["rows"]) == (1, sum(1 for t in texts if t))
