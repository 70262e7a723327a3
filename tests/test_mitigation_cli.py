"""`memscan mitigate`: end to end on a tiny model folder, JSON summary, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from memscan.cli import app

runner = CliRunner()


def test_mitigate_end_to_end(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.parquet"
    emb = tmp_path / "e.safetensors"
    args = ["mitigate", str(prompts_csv), "--model", str(tiny_model_dir), "--target", "0", "-o", str(out),
            "--id-column", "id", "--max-edits", "1", "--beam-width", "2", "--emit-embeddings", str(emb),
            "--embedding-steps", "2", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == 5 and summary["attempted"] == 4 and summary["skipped_empty"] == 1
    rows = pq.read_table(out).to_pandas()
    assert rows["prompt_id"].tolist() == list("abcde")
    assert {"rewritten", "score_before", "score_after", "similarity", "trigger_tokens", "edits", "status",
            "embedding_score"} <= set(rows.columns)
    assert emb.is_file()
    assert "s/prompt" in result.stderr
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--if-exists overwrite" in again.stderr


def test_mitigate_help_and_errors(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    help_text = runner.invoke(app, ["mitigate", "--help"]).stdout
    for option in ("--target", "--min-similarity", "--all", "--emit-embeddings"):
        assert option in help_text
    missing = runner.invoke(app, ["mitigate", str(tmp_path / "nope.csv"), "--target", "0"])
    assert missing.exit_code == 4 and len(missing.stderr.strip().splitlines()) == 1
    no_target = runner.invoke(app, ["mitigate", str(prompts_csv), "--model", str(tiny_model_dir),
                                    "-o", str(tmp_path / "x.parquet")])
    assert no_target.exit_code == 2 and "--target" in no_target.stderr
