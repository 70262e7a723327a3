"""Mitigation input (prompt file or detect output) and output table, through the library entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from memscan.config import DetectSettings
from memscan.detect import detect
from memscan.errors import InputError, UsageError
from memscan.mitigation import MitigateSettings, mitigate
from memscan.mitigation.table import is_detect_output, output_schema, read_rows
from memscan.models.loading import ScoringModel

SMALL = {"beam_width": 2, "max_edits": 1, "n_substitutes": 2, "insert_words": ("photo",), "min_similarity": 0.0}


@pytest.fixture
def detect_output(prompts_csv: Path, tmp_path: Path, tiny_model: ScoringModel) -> tuple[Path, float]:
    """A detect output with one distinct prompt flagged (threshold just under the top score)."""
    scores = detect(prompts_csv, None, DetectSettings(id_column="id"), model=tiny_model).scores["score"]
    threshold = float(np.nanmax(scores)) - 1e-4
    path = tmp_path / "scores.parquet"
    detect(prompts_csv, path, DetectSettings(id_column="id", threshold=threshold), model=tiny_model)
    return path, threshold


def test_detect_output_gives_its_flagged_rows(detect_output: tuple[Path, float], prompts_csv: Path) -> None:
    path, _ = detect_output
    assert is_detect_output(path) and not is_detect_output(prompts_csv)
    flagged = read_rows(path, prompt_column=None, id_column=None, all_rows=False)
    every = read_rows(path, prompt_column=None, id_column=None, all_rows=True)
    assert len(flagged) == 1 and len(every) == 5
    assert list(every.columns) == ["prompt_id", "prompt"] and every["prompt_id"].tolist() == list("abcde")


def test_detect_output_without_threshold_or_prompts(
    tmp_path: Path, prompts_csv: Path, tiny_model: ScoringModel
) -> None:
    bare = tmp_path / "bare.parquet"
    detect(prompts_csv, bare, DetectSettings(), model=tiny_model)
    with pytest.raises(UsageError, match="--all"):
        read_rows(bare, prompt_column=None, id_column=None, all_rows=False)
    hidden = tmp_path / "hidden.parquet"
    detect(prompts_csv, hidden, DetectSettings(threshold=0.0, store_prompt=False), model=tiny_model)
    with pytest.raises(InputError, match="no-store-prompt"):
        read_rows(hidden, prompt_column=None, id_column=None, all_rows=True)


def test_mitigate_all_rows_of_a_detect_output(
    detect_output: tuple[Path, float], tmp_path: Path, tiny_model: ScoringModel
) -> None:
    path, threshold = detect_output
    out = tmp_path / "mitigated.parquet"
    result = mitigate(path, out, MitigateSettings(target=threshold, all_rows=True, **SMALL), model=tiny_model)
    rows = pq.read_table(out).to_pandas()
    assert pq.read_schema(out).remove_metadata() == output_schema(embeddings=False)
    assert rows["status"].tolist().count("not_flagged") == 3 and rows.at[2, "status"] == "skipped_empty"
    calm = rows[rows["status"] == "not_flagged"]
    assert (calm["rewritten"] == calm["prompt"]).all()
    assert result.summary["attempted"] == 1 and result.summary["rows"] == 5
    assert result.summary["seconds_per_prompt"] > 0


def test_mitigate_with_embeddings(prompts_csv: Path, tmp_path: Path, tiny_model: ScoringModel) -> None:
    from memscan.mitigation import load_embeddings

    scores = detect(prompts_csv, None, DetectSettings(), model=tiny_model).scores["score"]
    target = float(np.nanmedian(scores))
    emb = tmp_path / "embeds.safetensors"
    settings = MitigateSettings(detect=DetectSettings(id_column="id"), target=target, emit_embeddings=emb,
                                embedding_steps=30, **SMALL)
    result = mitigate(prompts_csv, tmp_path / "m.parquet", settings, model=tiny_model)
    rows = result.rows
    attempted = rows[rows["status"].isin(["ok", "unresolved"])]
    assert set(load_embeddings(emb)) == set(attempted["prompt_id"])
    assert attempted["embedding_steps"].notna().all()
    assert rows.loc[~rows.index.isin(attempted.index), "embedding_score"].isna().all()
    verified = attempted["embedding_score_verified"]
    assert verified.notna().any()  # the independent noise bank checked the embeddings under the target
    resolved = attempted["embedding_resolved"].astype(bool)
    assert (attempted.loc[resolved, "embedding_score"] < target).all()
    assert (attempted.loc[resolved, "embedding_score_verified"] < target).all()
    assert result.summary["embedding_success_rate"] == pytest.approx(resolved.mean())
    assert attempted["embedding_similarity"].between(-1, 1).all()
    written = pd.read_parquet(tmp_path / "m.parquet")["embedding_resolved"]
    assert written.isna().sum() == len(rows) - len(attempted) and set(written.dropna()) <= {True, False}


def test_no_target_is_a_usage_error(prompts_csv: Path, tiny_model: ScoringModel) -> None:
    with pytest.raises(UsageError, match="--target"):
        mitigate(prompts_csv, None, MitigateSettings(), model=tiny_model)


def test_settings_are_checked() -> None:
    with pytest.raises(UsageError):
        MitigateSettings(min_similarity=2.0)
    with pytest.raises(UsageError):
        MitigateSettings(beam_width=0)
    with pytest.raises(UsageError):
        MitigateSettings(insert_words=("two words",))


def test_empty_flagged_selection_writes_an_empty_table(
    detect_output: tuple[Path, float], tmp_path: Path, tiny_model: ScoringModel
) -> None:
    path, _ = detect_output
    frame = pd.read_parquet(path)
    frame["flagged"] = False
    quiet = tmp_path / "quiet.parquet"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(
        pq.read_schema(path).metadata), quiet)
    result = mitigate(quiet, tmp_path / "o.parquet", MitigateSettings(target=1.0, **SMALL), model=tiny_model)
    assert len(result.rows) == 0 and result.summary["success_rate"] is None
