"""`memscan generate` on a tiny SD pipeline with a VAE (2 DDIM steps): PNGs and the decision log,
blocked prompts without images, resume, refused setting changes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from memscan.cli import app
from memscan.generate import safe_id

runner = CliRunner()
PROMPTS = ["a photo of a cat", "a red square on a blue background", "the mona lisa"]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt_id": ["cat", "square/red", "mona"], "prompt": PROMPTS}).to_csv(path, index=False)
    return path


def _run(model_dir: Path, prompts: Path, out: Path, *args: str):
    return runner.invoke(app, ["generate", str(prompts), "-o", str(out), "--model", str(model_dir), "--steps", "2",
                               "-k", "2", "--batch-size", "2", "--device", "cpu", "--id-column", "prompt_id", "--json",
                               *args])


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_writes_pngs_and_a_decision_log_and_a_rerun_does_nothing(
    tiny_vae_model_dir: Path, prompts: Path, tmp_path: Path
):
    out = tmp_path / "gen"
    result = _run(tiny_vae_model_dir, prompts, out, "--guard", "warn", "--threshold", "-1e9")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["prompts"], summary["images"], summary["actions"]) == (3, 6, {"warn": 3})
    log = pd.read_parquet(out / "decisions.parquet")
    assert len(log) == 6 and log["prompt_id"].tolist() == ["cat", "cat", "square/red", "square/red", "mona", "mona"]
    assert log["k"].tolist() == [0, 1] * 3 and log["seed"].tolist() == list(range(6))
    assert log["flagged"].all() and log["score_before"].notna().all() and log["error"].isna().all()
    names = [f"images/{safe_id(i)}-{k}.png" for i in ("cat", "square/red", "mona") for k in (0, 1)]
    assert log["image"].tolist() == names
    pngs = _pngs(out)
    assert len(pngs) == 6 and all(png.startswith(b"\x89PNG") for png in pngs.values())
    assert "/" not in safe_id("square/red") and safe_id("square/red") != safe_id("square_red")

    again = _run(tiny_vae_model_dir, prompts, out, "--guard", "warn", "--threshold", "-1e9")
    assert again.exit_code == 0, again.output
    assert (json.loads(again.stdout)["generated_now"], json.loads(again.stdout)["skipped_done"]) == (0, 3)
    assert _pngs(out) == pngs

    # unflagged prompts through the guard: the very pixels of an unguarded run
    off = _run(tiny_vae_model_dir, prompts, tmp_path / "off", "--guard", "off")
    quiet = _run(tiny_vae_model_dir, prompts, tmp_path / "quiet", "--guard", "warn", "--threshold", "1e9")
    assert off.exit_code == 0 and quiet.exit_code == 0, off.output + quiet.output
    assert _pngs(tmp_path / "off") == _pngs(tmp_path / "quiet") == pngs
    assert pd.read_parquet(tmp_path / "quiet" / "decisions.parquet")["action"].eq("none").all()


def test_block_writes_no_png_for_flagged_prompts(tiny_vae_model_dir: Path, prompts: Path, tmp_path: Path):
    out = tmp_path / "blocked"
    result = _run(tiny_vae_model_dir, prompts, out, "--guard", "block", "--threshold", "-1e9")
    assert result.exit_code == 0, result.output
    log = pd.read_parquet(out / "decisions.parquet")
    assert len(log) == 6 and log["action"].eq("block").all() and log["image"].isna().all()
    assert _pngs(out) == {}
    assert "0 images" in result.stderr


def test_resume_generates_only_missing_prompts_with_the_same_pixels(
    tiny_vae_model_dir: Path, prompts: Path, tmp_path: Path
):
    out = tmp_path / "gen"
    assert _run(tiny_vae_model_dir, prompts, out, "--guard", "off").exit_code == 0
    before = _pngs(out)
    (out / "log" / "part-000002.parquet").unlink()  # the second batch (row 2, "mona") never finished
    for png in (out / "images").glob(f"{safe_id('mona')}-*.png"):
        png.unlink()
    result = _run(tiny_vae_model_dir, prompts, out, "--guard", "off")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["generated_now"], summary["skipped_done"], summary["images"]) == (1, 2, 6)
    assert _pngs(out) == before


def test_changed_settings_are_refused(tiny_vae_model_dir: Path, prompts: Path, tmp_path: Path):
    out = tmp_path / "gen"
    assert _run(tiny_vae_model_dir, prompts, out, "--guard", "off").exit_code == 0
    changed = _run(tiny_vae_model_dir, prompts, out, "--guard", "block")
    assert changed.exit_code == 2 and "guard: 'off' -> 'block'" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1


def test_bad_input_is_one_line(tiny_vae_model_dir: Path, prompts: Path, tmp_path: Path):
    def run(*args: str, out: Path = tmp_path / "x", source: Path = prompts):
        result = _run(tiny_vae_model_dir, source, out, *args)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result

    assert run("--guard", "nonsense").exit_code == 2
    assert run("--guard", "block", "--optimize-late", "0.6").exit_code == 2  # only with --guard optimize
    assert run("--guard", "optimize", "--optimize-late", "1.5").exit_code == 2
    missing = run(source=tmp_path / "none.csv")
    assert missing.exit_code == 4 and "no such file" in missing.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something.txt").write_text("x")
    assert run(out=busy).exit_code == 2
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert run(out=afile).exit_code == 2
    # a model without a calibrated threshold cannot guard: one line naming the fix
    nothreshold = run("--guard", "block", out=tmp_path / "y")
    assert nothreshold.exit_code == 2 and "pass --threshold" in nothreshold.stderr


@pytest.mark.slow  # two generate runs; tests/test_guard.py covers the re-optimisation itself
def test_optimize_late_reaches_the_guard_and_the_log(tiny_vae_model_dir: Path, prompts: Path, tmp_path: Path):
    warned = tmp_path / "warn"
    assert _run(tiny_vae_model_dir, prompts, warned, "--guard", "warn", "--threshold", "1e9").exit_code == 0
    scores = pd.read_parquet(warned / "decisions.parquet").groupby("prompt")["score_before"].mean()
    threshold = f"{scores.max() - 0.05 * (scores.max() - scores.min()):.6f}"  # the top prompt only, in reach
    out = tmp_path / "gen"
    result = _run(tiny_vae_model_dir, prompts, out, "--guard", "optimize", "--threshold", threshold,
                  "--optimize-late", "0.5")
    assert result.exit_code == 0, result.stderr
    log = pd.read_parquet(out / "decisions.parquet")
    optimized = log[log["action"] == "optimize"]
    assert len(optimized) == 2 and optimized["image"].notna().all()
    assert (optimized["prompt_used"] == "<optimized embedding, optimized again from step 1>").all()
    assert json.loads((out / "settings.json").read_text())["optimize_late"] == 0.5
