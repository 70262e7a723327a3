"""detect(): file in, Parquet out, with the schema and run facts the run directory builds on."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from memscan.config import DetectSettings
from memscan.detect import detect, score_prompts
from memscan.errors import InputError, UsageError
from memscan.models.loading import ScoringModel

SCHEMA = ["prompt_id", "prompt", "norm", "alignment", "score", "flagged", "truncated", "status", "error"]


def test_detect_writes_one_row_per_input_row(tiny_model: ScoringModel, prompts_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    result = detect(prompts_csv, out, DetectSettings(seed=7, n_noise=2, id_column="id"), model=tiny_model)
    table = pq.read_table(out)
    assert table.column_names == SCHEMA
    assert str(table.schema.field("score").type) == "float"
    rows = table.to_pandas()
    assert rows["prompt_id"].tolist() == ["a", "b", "c", "d", "e"]
    assert rows["status"].tolist() == ["ok", "ok", "skipped_empty", "ok", "ok"]
    facts = json.loads(table.schema.metadata[b"memscan"])
    assert facts["seed"] == 7 and facts["n_noise"] == 2 and facts["method"] == "anisotropy"
    assert facts["w_norm"] == 1.0 and facts["w_align"] == 2.0 and facts["dtype"] == "float32"
    assert facts["memscan_version"] and len(facts["fingerprint"]) == 16
    assert result.summary["rows"] == 5 and result.summary["scored"] == 4
    assert result.summary["skipped_empty"] == 1 and result.summary["flagged"] is None
    top = result.summary["top"]
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_detect_matches_score_prompts(tiny_model: ScoringModel, prompts_csv: Path, tmp_path: Path) -> None:
    rows = detect(prompts_csv, tmp_path / "s.parquet", model=tiny_model).scores
    direct = score_prompts(["a photo of a cat", "the mona lisa by leonardo da vinci"], tiny_model)
    assert rows.loc[0, "score"] == pytest.approx(direct.loc[0, "score"], abs=1e-6)
    assert rows.loc[4, "score"] == pytest.approx(direct.loc[1, "score"], abs=1e-6)


def test_flag_overrides_reach_the_scores(tiny_model: ScoringModel, prompts_csv: Path, tmp_path: Path) -> None:
    settings = DetectSettings(w_norm=0.0, w_align=1.0, threshold=-2.0)
    rows = detect(prompts_csv, tmp_path / "s.parquet", settings, model=tiny_model).scores
    ok = rows[rows.status == "ok"]
    assert (ok["score"] == ok["alignment"]).all()
    assert ok["flagged"].all()  # every alignment is > -1 > -2


def test_existing_output_is_not_clobbered(tiny_model: ScoringModel, prompts_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    out.write_bytes(b"precious")
    with pytest.raises(UsageError, match="exists"):
        detect(prompts_csv, out, model=tiny_model)
    assert out.read_bytes() == b"precious"
    detect(prompts_csv, out, model=tiny_model, if_exists="overwrite")
    assert pq.read_table(out).num_rows == 5


def test_header_only_input_is_an_input_error(tiny_model: ScoringModel, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt\n")
    with pytest.raises(InputError):
        detect(empty, tmp_path / "s.parquet", model=tiny_model)


def test_a_calibrated_threshold_only_applies_to_what_it_was_calibrated_for(tiny_model: ScoringModel) -> None:
    from memscan.detect import applicable_threshold

    profile = tiny_model.profile.with_overrides(threshold=0.5, calibration={"method": "anisotropy", "n_noise": 1})
    assert applicable_threshold(DetectSettings(), profile, "anisotropy") == 0.5
    assert applicable_threshold(DetectSettings(n_noise=4), profile, "anisotropy") is None
    assert applicable_threshold(DetectSettings(method="wen"), profile, "wen") is None
    assert applicable_threshold(DetectSettings(w_align=0.0), profile, "anisotropy") is None
    explicit = profile.with_overrides(threshold=2.0)
    assert applicable_threshold(DetectSettings(method="wen", threshold=2.0), explicit, "wen") == 2.0


def test_norm_scale_flag_drops_a_calibrated_threshold(tiny_model: ScoringModel) -> None:
    """A threshold holds only for the score it was calibrated on; --norm-scale changes that score."""
    from memscan.detect import applicable_threshold

    profile = tiny_model.profile.with_overrides(threshold=0.5)
    assert applicable_threshold(DetectSettings(), profile, "anisotropy") == 0.5
    assert applicable_threshold(DetectSettings(norm_scale="reference-v"), profile, "anisotropy") is None
    with pytest.raises(UsageError, match="norm-scale"):
        DetectSettings(norm_scale="snr")
