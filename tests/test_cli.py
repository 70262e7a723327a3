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
