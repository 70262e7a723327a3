"""Progress a person can follow: per-batch lines, rate without model loading, top table, status in words."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from memscan.cli import app
from memscan.config import DetectSettings
from memscan.run import RunOptions, prepare_run, run_detect

runner = CliRunner()

PROGRESS = re.compile(
    r"^memscan: (?:(\d+)/(\d+) shards, )?(\d+)/(\d+) rows \(\d+%\), (?:\d+ failed shards?, )?"
    r"([\d.]+|-) rows/s, ETA (.+)$"
)


def _prompts(path: Path, rows: int) -> Path:
    pd.DataFrame({"prompt": [f"a photo of object {i} in style {i % 3}" for i in range(rows)]}).to_csv(path, index=False)
    return path


def _progress_lines(stderr: str) -> list[re.Match[str]]:
    return [m for line in stderr.splitlines() if (m := PROGRESS.match(line))]


def _assert_plain(stderr: str) -> None:
    """Log mode: no carriage returns, no escape codes (cron mails stay readable)."""
    assert "\r" not in stderr and "\x1b" not in stderr


def test_single_file_detect_logs_a_line_per_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts(tmp_path / "p.csv", 12)
    out = tmp_path / "s.parquet"
    result = runner.invoke(app, ["detect", str(prompts), "-o", str(out), "--model", str(tiny_model_dir),
                                 "--batch-size", "2", "--log-interval", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    _assert_plain(result.stderr)
    lines = result.stderr.splitlines()
    assert lines[0] == (f"memscan: scoring 12 rows of {prompts} with model {tiny_model_dir} (anisotropy, n_noise 1) "
                        f"-> {out}")
    assert re.match(r"^memscan: model loaded in [\d.]+ s \(cpu, float32\)$", lines[1]), lines[1]
    progress = _progress_lines(result.stderr)
    assert [int(m[3]) for m in progress] == [2, 4, 6, 8, 10, 12]  # one line per batch of 2
    assert all(m[4] == "12" and m[5] != "-" for m in progress)
    assert progress[-1][6] == "0 s" and progress[0][6].endswith(" s")


def test_run_directory_of_one_shard_logs_per_batch(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    prompts = _prompts(tmp_path / "p.csv", 10)
    settings = DetectSettings(model=str(tiny_model_dir), device="cpu", batch_size=3)
    outcome = run_detect(prompts, tmp_path / "run", settings, RunOptions(shard_size=100), log_interval=0,
                         interactive=False)
    assert outcome.exit_code == 0
    stderr = capsys.readouterr().err
    _assert_plain(stderr)
    assert stderr.splitlines()[0].startswith(f"memscan: detect run {tmp_path / 'run'}: 10 rows in 1 shard")
    assert "memscan: model loaded in " in stderr
    progress = _progress_lines(stderr)
    mid_shard = [m for m in progress if m[1] == "0"]  # before the one shard is done
    assert [int(m[3]) for m in mid_shard] == [3, 6, 9, 10]
    assert all(m[5] != "-" for m in mid_shard)
    assert progress[-1].group(1, 2, 3, 4) == ("1", "1", "10", "10")


@pytest.mark.slow  # ~20 s on a loaded 2-core machine: two spawned processes import torch
def test_worker_processes_report_batches_to_the_parent(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    prompts = _prompts(tmp_path / "p.csv", 12)
    settings = DetectSettings(model=str(tiny_model_dir), device="cpu", batch_size=2)
    outcome = run_detect(prompts, tmp_path / "run", settings, RunOptions(shard_size=6), workers=2, log_interval=0,
                         interactive=False)
    assert outcome.exit_code == 0
    stderr = capsys.readouterr().err
    # one line per worker that loaded before the run ended: a worker still loading when the other has
    # done both shards is not waited for (the parent stops reading when no shard is left)
    assert 1 <= stderr.count("model loaded in ") <= 2
    rows = [int(m[3]) for m in _progress_lines(stderr)]
    assert any(r % 6 for r in rows), rows  # counts that fall inside a shard came from the workers' batches
    assert rows == sorted(rows) and rows[-1] == 12


def test_rate_is_counted_from_the_end_of_model_loading() -> None:
    from memscan.progress import Progress

    now = [0.0]
    stream = io.StringIO()
    progress = Progress(interval=0, stream=stream, interactive=False, clock=lambda: now[0])
    progress.start("scoring 100 rows", total=100)
    now[0] = 50.0
    progress.model_loaded()
    now[0] = 52.0
    progress.advance(20)
    now[0] = 54.0
    progress.advance(20)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["memscan: scoring 100 rows", "memscan: model loaded in 50 s"]
    assert lines[2] == "memscan: 20/100 rows (20%), 10.0 rows/s, ETA 8.0 s"
    assert lines[3] == "memscan: 40/100 rows (40%), 10.0 rows/s, ETA 6.0 s"
    assert len(lines) == 4  # close does not repeat a line that is already the last state


def test_detect_rate_leaves_out_a_slow_model_load(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import importlib

    from memscan.progress import Progress

    detect_module = importlib.import_module("memscan.detect")  # the module, not the function memscan.detect

    now = [0.0]

    def clock() -> float:
        now[0] += 0.001
        return now[0]

    real_load = detect_module.load_model

    def slow_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        now[0] += 100.0  # 100 s of loading on the injected clock
        return real_load(*args, **kwargs)

    monkeypatch.setattr(detect_module, "load_model", slow_load)
    stream = io.StringIO()
    progress = Progress(interval=0, stream=stream, interactive=False, clock=clock)
    prompts = _prompts(tmp_path / "p.csv", 8)
    detect_module.detect(prompts, None, DetectSettings(model=str(tiny_model_dir), device="cpu", batch_size=4),
                         progress=progress)
    text = stream.getvalue()
    assert re.search(r"^memscan: model loaded in 1 min 40 s", text, re.M), text
    rates = [float(m[5]) for m in _progress_lines(text)]
    assert rates and min(rates) > 8 / 100 * 50, rates  # with the load in it the rate would be <= 0.08 rows/s


def test_progress_bar_on_a_terminal_shows_rows_rate_and_eta() -> None:
    from memscan.progress import Progress

    now = [0.0]
    stream = io.StringIO()
    progress = Progress(interval=60, stream=stream, interactive=True, clock=lambda: now[0])
    progress.start("scoring 10 rows", total=10)
    progress.model_loaded(1.5)
    now[0] = 2.0
    progress.advance(4)
    progress.close()
    text = stream.getvalue()
    assert "model loaded in 1.5 s" in text
    assert "4/10 rows" in text and "2.0 rows/s" in text and "ETA 3.0 s" in text


def test_a_terminal_sees_the_start_line_while_the_model_loads() -> None:
    """Without a terminal the start line waits for news (a failed load logs only its error)."""
    from memscan.progress import Progress

    tty, log = io.StringIO(), io.StringIO()
    Progress(stream=tty, interactive=True).start("scoring 10 rows of p.csv with model sd-v1-4", total=10)
    Progress(stream=log, interactive=False).start("scoring 10 rows of p.csv with model sd-v1-4", total=10)
    assert "scoring 10 rows of p.csv with model sd-v1-4; loading the model" in tty.getvalue()
    assert log.getvalue() == ""


def test_durations_in_words() -> None:
    from memscan.progress import format_duration

    assert [format_duration(s) for s in (None, 0, 3.24, 42.4, 725, 3 * 3600 + 4 * 60 + 30, 2 * 86400 + 3600)] == [
        "-", "0 s", "3.2 s", "42 s", "12 min 5 s", "3 h 4 min", "2 d 1 h",
    ]


def test_top_table_one_line_per_prompt_literal_brackets_flag_and_threshold(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    long = "a castle on a hill " * 530  # ~10,000 characters
    prompts = tmp_path / "p.csv"
    texts = [long, "masterpiece [/] a cat", "[cat:dog:0.5] [bold]x"]
    pd.DataFrame({"id": ["long", "close", "cat"], "prompt": texts}).to_csv(prompts, index=False)
    result = runner.invoke(app, ["detect", str(prompts), "-o", str(tmp_path / "s.parquet"), "--model",
                                 str(tiny_model_dir), "--id-column", "id", "--threshold", "-1000", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = result.stderr
    assert "threshold -1000" in table
    assert "masterpiece [/] a cat" in table and "[cat:dog:0.5] [bold]x" in table
    long_lines = [line for line in table.splitlines() if "a castle on a hill" in line]
    assert len(long_lines) == 1 and "…" in long_lines[0] and len(long_lines[0]) <= 200
    rows = [line for line in table.splitlines() if re.search(r"\b(long|close|cat)\b", line) and "│" in line]
    assert len(rows) == 3 and all(" yes " in line for line in rows)
    assert "flag" in table


def test_status_in_words(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts(tmp_path / "p.csv", 30)
    settings = DetectSettings(model=str(tiny_model_dir), device="cpu")
    out = tmp_path / "run"
    prepare_run(prompts, out, settings, RunOptions(shard_size=10))
    planned = runner.invoke(app, ["status", str(out)])
    assert planned.exit_code == 0, planned.output
    text = planned.stdout
    assert "None" not in text and "null" not in text
    assert "0 of 3 done" in text and "0 of 30" in text and "ETA" in text and "unknown" in text
    run_detect(prompts, out, settings, RunOptions(shard_size=10), interactive=False)
    done = runner.invoke(app, ["status", str(out)]).stdout
    assert "None" not in done and "null" not in done
    assert "3 of 3 done" in done and "30 of 30" in done and "complete" in done
    assert "not calibrated" in done  # the tiny model has no threshold: nothing is flagged
    assert re.search(r"rate\s+[\d.]+ rows/s", done), done
    as_json = runner.invoke(app, ["status", str(out), "--json"]).stdout
    assert '"flagged": null' in as_json and '"eta_s": 0.0' in as_json  # --json stays machine-readable


@pytest.mark.slow
def test_ray_actors_report_batches_to_the_driver(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ray = pytest.importorskip("ray")
    prompts = _prompts(tmp_path / "p.csv", 12)
    settings = DetectSettings(model=str(tiny_model_dir), device="cpu", batch_size=2)
    try:
        outcome = run_detect(prompts, tmp_path / "run", settings, RunOptions(shard_size=6), executor="ray", workers=2,
                             log_interval=0, interactive=False)
    finally:
        ray.shutdown()
    assert outcome.exit_code == 0
    stderr = capsys.readouterr().err
    # one line per worker that loaded before the run ended: a worker still loading when the other has
    # done both shards is not waited for (the parent stops reading when no shard is left)
    assert 1 <= stderr.count("model loaded in ") <= 2
    rows = [int(m[3]) for m in _progress_lines(stderr)]
    assert any(r % 6 for r in rows), rows
    assert rows[-1] == 12


MITIGATE_TEXTS = ["a photo of a cat", "a red square on a blue background", "", "the mona lisa by leonardo da vinci",
                  "a dog in the park", "van gogh starry night", "a bowl of fruit", "a portrait of a man"]


def test_mitigate_run_counts_rows_as_they_are_done(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from memscan.detect import detect
    from memscan.mitigation import MitigateSettings
    from memscan.mitigation.run import run_mitigate

    prompts = tmp_path / "p.csv"
    pd.DataFrame({"prompt": MITIGATE_TEXTS}).to_csv(prompts, index=False)
    detect_settings = DetectSettings(model=str(tiny_model_dir), device="cpu")
    target = float(np.nanmedian(detect(prompts, None, detect_settings).scores["score"]))
    settings = MitigateSettings(detect=detect_settings, target=target, beam_width=2, max_edits=1, n_substitutes=2,
                                insert_words=("photo",), min_similarity=0.0, verify_noise=0)
    outcome = run_mitigate(prompts, tmp_path / "run", settings, RunOptions(shard_size=100), log_interval=0,
                           interactive=False)
    assert outcome.exit_code == 0
    above = outcome.summary["flagged"]
    assert above >= 2
    stderr = capsys.readouterr().err
    assert stderr.splitlines()[0].startswith(f"memscan: mitigate run {tmp_path / 'run'}: 8 rows in 1 shard")
    mid_shard = [int(m[3]) for m in _progress_lines(stderr) if m[1] == "0"]
    # the rows not above the target once scored, then one row per rewrite search
    assert mid_shard == list(range(8 - above, 9))


def test_one_rank_of_several_counts_its_own_shards(tiny_model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    prompts = _prompts(tmp_path / "p.csv", 10)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    settings = DetectSettings(model=str(tiny_model_dir), device="cpu", batch_size=4)
    outcome = run_detect(prompts, tmp_path / "run", settings, RunOptions(shard_size=3), log_interval=0,
                         interactive=False)
    assert outcome.exit_code == 0  # this rank's shards (1 and 3 of 0..3) are done
    stderr = capsys.readouterr().err
    assert ", rank 1 of 2" in stderr.splitlines()[0]
    progress = _progress_lines(stderr)
    assert progress[-1].group(1, 2, 3, 4) == ("2", "2", "4", "4")  # shard 1 (3 rows) and shard 3 (1 row)
    assert all(m[4] == "4" for m in progress)
