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


# ------------------------------------------------------------------ a calibrated profile's settings


def _calibrated_profile(tmp_path: Path, model_dir: Path, *, threshold: float = -100.0) -> Path:
    """A profile of the tiny model folder calibrated (so its [calibration] says) with n_noise 2, seed 7;
    the threshold is low enough to flag every prompt, so `flagged` shows whether it was kept."""
    path = tmp_path / "calibrated.toml"
    path.write_text(
        f'source = "{model_dir}"\nresolution = 64\n\n[scoring]\nw_norm = 1.0\nw_align = 2.0\n'
        f"threshold = {threshold!r}\n\n[calibration]\nmethod = \"anisotropy\"\nn_noise = 2\nseed = 7\n",
        encoding="utf-8",
    )
    return path


def test_a_calibrated_profile_gives_the_defaults_of_noise_seed_and_method(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without flags, `--model calibrated.toml` scores with the n_noise, seed and method it was
    calibrated with, so its threshold is kept; an explicit flag that differs drops it with the warning."""
    from typer.testing import CliRunner

    from memscan.cli import app

    profile = _calibrated_profile(tmp_path, tiny_model_dir)
    settings = DetectSettings(model=str(profile))
    assert (settings.n_noise, settings.seed, settings.method) == (2, 7, "anisotropy")
    assert (DetectSettings(model=str(tiny_model_dir)).n_noise, DetectSettings().seed) == (1, 51)  # no calibration
    assert DetectSettings(model=str(profile), n_noise=1).n_noise == 1

    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na photo of a cat\na red square\n", encoding="utf-8")
    runner = CliRunner()
    out = tmp_path / "s.parquet"
    result = runner.invoke(app, ["detect", str(prompts), "-o", str(out), "--model", str(profile)])
    assert result.exit_code == 0, result.output
    facts = json.loads(pq.read_schema(out).metadata[b"memscan"])
    assert (facts["n_noise"], facts["seed"], facts["method"], facts["threshold"]) == (2, 7, "anisotropy", -100.0)
    assert pq.read_table(out).to_pandas()["flagged"].tolist() == [True, True]
    assert "not flagging" not in caplog.text

    explicit = runner.invoke(app, ["detect", str(prompts), "-o", str(tmp_path / "one.parquet"), "--model", str(profile),
                                   "--n-noise", "1"])
    assert explicit.exit_code == 0, explicit.output
    assert "not flagging with the profile's threshold: it was calibrated with n_noise=2, not 1" in caplog.text
    one = pq.read_table(tmp_path / "one.parquet")
    assert json.loads(one.schema.metadata[b"memscan"])["n_noise"] == 1 and one.to_pandas()["flagged"].isna().all()


def test_a_model_object_resolves_the_defaults_against_its_own_profile(tiny_model: ScoringModel, tmp_path: Path) -> None:
    """`detect(..., model=loaded)` takes the defaults from the loaded model's profile, not from `settings.model`."""
    profile = tiny_model.profile.with_overrides(threshold=-100.0, calibration={"n_noise": 2, "seed": 7})
    model = ScoringModel(**{**tiny_model.__dict__, "profile": profile})
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na photo of a cat\n", encoding="utf-8")
    result = detect(prompts, None, DetectSettings(), model=model)
    assert result.summary["threshold"] == -100.0 and result.scores["flagged"].tolist() == [True]
    assert score_prompts(["a photo of a cat"], model)["score"].iloc[0] == pytest.approx(result.scores["score"].iloc[0])


def test_the_fingerprint_uses_the_resolved_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A run made with the profile's defaults and one given the same values as flags are the same run
    (a resume compares resolved settings); a different n_noise is not."""
    from memscan.config import fingerprint
    from memscan.run.job import fingerprint_fields

    profile = _calibrated_profile(tmp_path, tiny_model_dir)
    implicit, explicit = DetectSettings(model=str(profile)), DetectSettings(model=str(profile), n_noise=2, seed=7,
                                                                            method="anisotropy")
    assert fingerprint(implicit) == fingerprint(explicit) != fingerprint(DetectSettings(model=str(profile), n_noise=1))
    assert fingerprint_fields(implicit, [], 10) == fingerprint_fields(explicit, [], 10)
    assert implicit.to_dict() == explicit.to_dict() and implicit.to_dict()["n_noise"] == 2


def test_mitigate_takes_its_target_from_a_calibrated_profile_or_says_why_not(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from memscan.cli import app
    from memscan.mitigation import MitigateSettings
    from memscan.mitigation.run import resolve_target

    profile = _calibrated_profile(tmp_path, tiny_model_dir, threshold=1e6)  # nothing above it: no search
    assert resolve_target(MitigateSettings(detect=DetectSettings(model=str(profile)))) == 1e6
    with pytest.raises(UsageError, match=r"calibrated with n_noise=2, not 1.*--target"):
        resolve_target(MitigateSettings(detect=DetectSettings(model=str(profile), n_noise=1)))
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na photo of a cat\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["mitigate", str(prompts), "-o", str(tmp_path / "m.parquet"), "--model", str(profile),
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target"] == 1e6
    refused = runner.invoke(app, ["mitigate", str(prompts), "-o", str(tmp_path / "n.parquet"), "--model", str(profile),
                                  "--device", "cpu", "--n-noise", "1"])
    assert refused.exit_code == 2
    assert "calibrated with n_noise=2, not 1" in refused.stderr and "--target" in refused.stderr
