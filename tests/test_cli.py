"""The command line: help, exit codes, one-line errors, output schema."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from memscan.cli import app

runner = CliRunner()


def _detect(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["detect", *map(str, args)])


def _one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_help_lists_commands_and_options() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "detect" in result.stdout
    detect_help = runner.invoke(app, ["detect", "--help"])
    assert detect_help.exit_code == 0
    for option in ("--model", "--n-noise", "--seed", "--batch-size", "--dtype", "--prompt-column", "--json"):
        assert option in detect_help.stdout


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("memscan ")


def test_detect_end_to_end_json(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    result = _detect(prompts_csv, "-o", out, "--model", tiny_model_dir, "--id-column", "id", "--json", "--n-noise", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == 5 and summary["scored"] == 4 and summary["output"] == str(out)
    table = pq.read_table(out)
    assert table.column_names == [
        "prompt_id", "prompt", "norm", "alignment", "score", "flagged", "truncated", "status", "error",
    ]
    assert table.column("prompt_id").to_pylist() == ["a", "b", "c", "d", "e"]
    facts = json.loads(table.schema.metadata[b"memscan"])
    assert facts["n_noise"] == 2 and facts["prediction_type"] == "epsilon"


def test_no_store_prompt_and_fail_on_flagged(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    result = _detect(prompts_csv, "-o", out, "--model", tiny_model_dir, "--no-store-prompt",
                     "--threshold", "-1000", "--fail-on-flagged")
    assert result.exit_code == 10, result.output
    assert "prompt" not in pq.read_table(out).column_names  # the output is written before exit 10
    assert pq.read_table(out).column("flagged").to_pylist() == [True, True, None, True, True]


@pytest.mark.parametrize(
    ("setup", "extra", "code", "needle"),
    [
        ("missing", [], 4, "missing.csv"),
        ("csv", ["--prompt-column", "nope"], 4, "nope"),
        ("empty", [], 4, "empty.csv"),
        ("latin1", [], 4, "latin1.txt"),
        ("badgz", [], 4, "bad.csv.gz"),
        ("csv", ["--model", "no-such-profile"], 2, "no-such-profile"),
        ("csv", ["--model", "{tmp}/weights.ckpt"], 2, "--allow-pickle"),
        ("csv", ["--n-noise", "0"], 2, "--n-noise"),
        ("csv", ["--dtype", "fp8"], 2, "--dtype"),
        ("csv", ["--method", "magic"], 2, "magic"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code(
    tmp_path: Path, tiny_model_dir: Path, setup: str, extra: list[str], code: int, needle: str
) -> None:
    paths = {
        "missing": tmp_path / "missing.csv",
        "csv": tmp_path / "ok.csv",
        "empty": tmp_path / "empty.csv",
        "latin1": tmp_path / "latin1.txt",
        "badgz": tmp_path / "bad.csv.gz",
    }
    paths["csv"].write_text("prompt\na cat\n")
    paths["empty"].write_text("")
    paths["latin1"].write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    paths["badgz"].write_bytes(gzip.compress(b"prompt\na cat\n")[:20])
    (tmp_path / "weights.ckpt").write_bytes(b"not really a pickle")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    if "--model" not in extra:
        extra += ["--model", str(tiny_model_dir)]
    result = _detect(paths[setup], "-o", tmp_path / "out.parquet", *extra)
    assert result.exit_code == code, result.output
    line = _one_line_error(result)
    assert line.startswith("memscan: error:") and needle in line
    assert not (tmp_path / "out.parquet").exists()


def test_existing_output_exit_2(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    out.write_bytes(b"keep")
    result = _detect(prompts_csv, "-o", out, "--model", tiny_model_dir)
    assert result.exit_code == 2 and "--if-exists overwrite" in _one_line_error(result)
    assert out.read_bytes() == b"keep"


def test_models_lists_profiles() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ("sd-v1-4", "sd-v2", "realistic-vision"):
        assert name in result.stdout


def test_models_fits_80_columns_and_says_what_each_profile_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    out = runner.invoke(app, ["models"]).stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    sd2 = next(line for line in out.splitlines() if line.startswith("│ sd-v2 "))
    assert "v (raw) 768" in sd2 and "1 / 0.1" in sd2 and "reference-v" in sd2
    assert "  demo: bundled demo/model" in out and "  sd-v1-4: CompVis/stable-diffusion-v1-4" in out


def test_settings_precedence_config_env_flags(
    tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """defaults < --config FILE < MEMSCAN_DETECT_* environment < flags."""
    config = tmp_path / "memscan.toml"
    config.write_text(f'[detect]\nmodel = "{tiny_model_dir}"\nseed = 7\nn-noise = 2\n')

    def facts(*extra: str) -> dict:
        out = tmp_path / "s.parquet"
        result = runner.invoke(app, ["--config", str(config), "detect", str(prompts_csv), "-o", str(out),
                                     "--if-exists", "overwrite", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(pq.read_table(out).schema.metadata[b"memscan"])

    assert (facts()["seed"], facts()["n_noise"]) == (7, 2)
    monkeypatch.setenv("MEMSCAN_DETECT_SEED", "8")
    assert facts()["seed"] == 8
    assert facts("--seed", "9")["seed"] == 9
    config.write_text("[detect]\nseeed = 1\n")
    bad = runner.invoke(app, ["--config", str(config), "detect", str(prompts_csv)])
    assert bad.exit_code == 2 and "seeed" in bad.stderr


# ----------------------------------------------------------------- issue 11: prompts are data, outputs are safe


def _labelled_scores(path: Path, *, method: str = "anisotropy", n: int = 40) -> tuple[Path, Path]:
    """A scores file of `n` prompts (half memorized, scored higher) with its run facts, and a labels
    file next to it (`labels.csv`: prompt_id, prompt, label)."""
    import numpy as np
    import pandas as pd

    from memscan.io.scores import scores_schema, to_table, write_scores

    rng = np.random.default_rng(0)
    label = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(int)
    norm = (rng.normal(size=n) + 2 * label).astype("float32")
    align = rng.normal(size=n).astype("float32")
    frame = pd.DataFrame({
        "prompt_id": [f"p{i}" for i in range(n)], "prompt": [f"a [blurry] photo {i}" for i in range(n)],
        "norm": norm, "alignment": align, "score": norm + 2 * align, "flagged": None, "truncated": False,
        "status": "ok", "error": None,
    })
    facts = {"method": method, "model": "demo", "n_noise": 1, "seed": 51, "w_norm": 1.0, "w_align": 2.0}
    write_scores(to_table(frame, scores_schema(("norm", "alignment", "score")), facts), path)
    labels = path.parent / "labels.csv"
    frame[["prompt_id", "prompt"]].assign(label=label).to_csv(labels, index=False)
    return path, labels


def test_help_keeps_square_brackets() -> None:
    assert "[command]" in runner.invoke(app, ["--help"]).stdout
    assert "memscan[ray]" in runner.invoke(app, ["detect", "--help"]).stdout


def test_every_command_help_has_an_example_and_detect_lists_the_methods() -> None:
    import typer.main

    from memscan.methods import available_methods

    commands = [name for name in typer.main.get_command(app).commands if name != "demo"]  # demo: its own group
    expected = {"detect", "status", "merge", "models", "evaluate", "calibrate", "report", "bench", "mitigate"}
    assert expected <= set(commands)
    for command in commands:
        text = runner.invoke(app, [command, "--help"]).stdout
        assert "Example" in text and f"memscan {command}" in text.split("Example", 1)[1], command
    detect_help = " ".join(runner.invoke(app, ["detect", "--help"]).stdout.split())
    assert all(name in detect_help.split("--method", 1)[1][:300] for name in available_methods())


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["detect", "x.csv", "--bogus"], "--bogus"), (["detect"], "INPUT"), (["nosuch"], "nosuch"),
     (["--bogus"], "--bogus"), (["detect", "x.csv", "--n-noise", "two"], "--n-noise")],
)
def test_click_usage_errors_are_one_line_exit_2(args: list[str], needle: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    line = _one_line_error(result)
    assert line.startswith("memscan") and "error:" in line and needle in line and "╭" not in result.output


def test_user_strings_are_not_rich_markup_in_evaluate(tmp_path: Path) -> None:
    scores, labels = _labelled_scores(tmp_path / "s.parquet", method="wen [/] [bold]x")
    result = runner.invoke(app, ["evaluate", str(scores), "--labels", str(labels)])
    assert result.exit_code == 0, result.output
    assert "wen [/] [bold]x" in result.stderr


def test_bracketed_prompts_are_printed_as_written(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SD prompt syntax ([blurry], [cat:dog:0.5]) and a stray [/] are data: detect exits 0 and shows them."""
    prompts = tmp_path / "p.csv"
    prompts.write_text('prompt\n"masterpiece, [blurry], a cat"\n[cat:dog:0.5]\na [/] b\n[bold]loud\n', encoding="utf-8")
    out = tmp_path / "s.parquet"
    result = _detect(prompts, "-o", out, "--model", tiny_model_dir)
    assert result.exit_code == 0, result.output
    for text in ("masterpiece, [blurry], a cat", "[cat:dog:0.5]", "a [/] b", "[bold]loud"):
        assert text in result.stderr
    assert pq.read_table(out).column("prompt").to_pylist()[2] == "a [/] b"


def test_environment_sets_only_real_options_by_their_flag_names(
    tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path
) -> None:
    """MEMSCAN_VERSION / MEMSCAN_DETECT_HELP must not turn a cron audit into a no-op."""
    out = tmp_path / "s.parquet"
    env = {"MEMSCAN_VERSION": "1", "MEMSCAN_DETECT_HELP": "1", "MEMSCAN_DETECT_JSON": "1",
           "MEMSCAN_DETECT_MODEL": str(tiny_model_dir)}
    result = runner.invoke(app, ["detect", str(prompts_csv), "-o", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 5 and out.is_file()


def test_config_keys_are_flag_names(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    config = tmp_path / "memscan.toml"
    config.write_text(f'[detect]\nmodel = "{tiny_model_dir}"\njson = true\nn-noise = 2\nif_exists = "overwrite"\n')
    out = tmp_path / "s.parquet"
    result = runner.invoke(app, ["--config", str(config), "detect", str(prompts_csv), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 5
    config.write_text("[detect]\njson_summary = true\n")
    bad = runner.invoke(app, ["--config", str(config), "detect", str(prompts_csv)])
    line = _one_line_error(bad)
    assert bad.exit_code == 2 and "json_summary" in line and "json" in line.split("json_summary", 1)[1]
    assert "n-noise" in line and "help" not in line.split("json_summary", 1)[1]


@pytest.mark.parametrize("name", ["out.csv", "scores.json"])
def test_detect_output_with_a_foreign_suffix_is_refused(name: str, prompts_csv: Path, tmp_path: Path) -> None:
    result = _detect(prompts_csv, "-o", tmp_path / name)
    assert result.exit_code == 2
    line = _one_line_error(result)
    assert ".parquet" in line and name in line
    assert not (tmp_path / name).exists()


def test_detect_output_location_is_checked_before_the_model_loads(
    prompts_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(importlib.import_module("memscan.detect"), "build_scorer", no_model)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _detect(prompts_csv, "-o", blocker / "a.parquet")
    assert result.exit_code == 4, result.output
    assert "cannot write" in _one_line_error(result)


@pytest.mark.parametrize("command", ["report", "calibrate"])
def test_report_and_calibrate_never_replace_their_inputs(command: str, tmp_path: Path) -> None:
    scores, labels = _labelled_scores(tmp_path / "s.parquet")
    before = {p: p.read_bytes() for p in (scores, labels)}
    for target in (scores, labels):
        for extra in ([], ["--if-exists", "overwrite"]):
            result = runner.invoke(app, [command, str(scores), "--labels", str(labels), "-o", str(target), *extra])
            assert result.exit_code == 2, result.output
            assert "input" in _one_line_error(result)
    assert {p: p.read_bytes() for p in (scores, labels)} == before


def test_report_refuses_an_existing_output_unless_told(tmp_path: Path) -> None:
    scores, _ = _labelled_scores(tmp_path / "s.parquet")
    page = tmp_path / "r.html"
    page.write_text("keep")
    result = runner.invoke(app, ["report", str(scores), "-o", str(page)])
    assert result.exit_code == 2 and "--if-exists overwrite" in _one_line_error(result)
    assert page.read_text() == "keep"
    again = runner.invoke(app, ["report", str(scores), "-o", str(page), "--if-exists", "overwrite"])
    assert again.exit_code == 0, again.output
    assert page.read_text().startswith("<!doctype html>")
    (tmp_path / "dir.html").mkdir()
    folder = runner.invoke(app, ["report", str(scores), "-o", str(tmp_path / "dir.html")])
    assert folder.exit_code == 2 and "directory" in _one_line_error(folder)


def test_merge_never_replaces_the_runs_inputs(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = _detect(prompts_csv, "-o", run, "--model", tiny_model_dir, "--shard-size", "2")
    assert done.exit_code == 0, done.output
    before = prompts_csv.read_bytes()
    for extra in ([], ["--if-exists", "overwrite"]):
        result = runner.invoke(app, ["merge", str(run), "-o", str(prompts_csv), *extra])
        assert result.exit_code == 2, result.output
        _one_line_error(result)
        shard = runner.invoke(app, ["merge", str(run), "-o", str(run / "shards" / "part-00000.parquet"), *extra])
        assert shard.exit_code == 2, shard.output
    assert prompts_csv.read_bytes() == before
    merged = tmp_path / "merged.parquet"
    assert runner.invoke(app, ["merge", str(run), "-o", str(merged)]).exit_code == 0
    again = runner.invoke(app, ["merge", str(run), "-o", str(merged)])
    assert again.exit_code == 2 and "--if-exists overwrite" in _one_line_error(again)
    assert runner.invoke(app, ["merge", str(run), "-o", str(merged), "--if-exists", "overwrite"]).exit_code == 0


def test_bench_checks_flags_and_outputs_before_the_model_loads(
    prompts_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memscan.models.loading

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the flags and outputs were checked")

    monkeypatch.setattr(memscan.models.loading, "load_model", no_model)
    suite = tmp_path / "five.csv"
    suite.write_text("prompt,label\na cat,1\na dog,0\n")
    before = suite.read_bytes()
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    cases = [
        (["--batch-size", "0"], 2, "--batch-size"),
        (["--n-noise", "-1"], 2, "--n-noise"),
        (["--limit", "0"], 2, "--limit"),
        (["--methods", "anisotropy,magic"], 2, "magic"),
        (["--v-convention", "foo"], 2, "--v-convention"),
        (["--norm-scale", "snr"], 2, "--norm-scale"),
        (["--w-norm", "abc"], 2, "--w-norm"),
        (["--report", str(suite)], 2, "input"),
        (["--report", str(suite), "--if-exists", "overwrite"], 2, "input"),
        (["--out-dir", str(blocker)], 2, "not a directory"),
        (["--report", str(blocker / "r.html")], 4, "cannot write"),
    ]
    for extra, code, needle in cases:
        result = runner.invoke(app, ["bench", "--suite", str(suite), *extra])
        assert result.exit_code == code, (extra, result.output)
        assert needle in _one_line_error(result), extra
    assert suite.read_bytes() == before


def test_mitigate_refuses_its_input_and_one_path_for_two_outputs(prompts_csv: Path, tmp_path: Path) -> None:
    same = runner.invoke(app, ["mitigate", str(prompts_csv), "--target", "0", "-o", str(tmp_path / "m.parquet"),
                               "--emit-embeddings", str(tmp_path / "m.parquet")])
    assert same.exit_code == 2 and "m.parquet" in _one_line_error(same)
    scores, _ = _labelled_scores(tmp_path / "s.parquet")
    into_input = runner.invoke(app, ["mitigate", str(scores), "--target", "0", "-o", str(scores),
                                     "--if-exists", "overwrite"])
    assert into_input.exit_code == 2 and "input" in _one_line_error(into_input)


@pytest.mark.slow  # 7 s of subprocess start-up; tests/test_outputs.py checks the umask rule in-process
def test_written_files_honour_the_umask_end_to_end(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    """A subprocess, so the umask is the process's own, as under cron or a shared shell."""
    import stat
    import subprocess
    import sys

    out = tmp_path / "s.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "memscan", "detect", str(prompts_csv), "-o", str(out), "--model", str(tiny_model_dir)],
        capture_output=True, text=True, umask=0o007, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o660
