"""`bench`: suites, one-command benchmark on a tiny model with synthetic labels, outputs that
`evaluate` reads back to the same numbers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from memscan.bench import benchmark_dir, default_suite, load_suite, run_bench
from memscan.cli import app
from memscan.errors import InputError
from memscan.evaluate import evaluate_files
from memscan.models.loading import ScoringModel
from memscan.models.profiles import ModelProfile

SHA256 = {
    "sd1_mem.txt": "6f11239c621a7846979170c79d79f86a31441e044a7bc0b5d952ba8a5ca0fb56",
    "sd2_mem.txt": "02f212d64767b4f066ca1c9ddc161a6ea5cf717aadf7f45e44bfe21856563e8d",
    "sd1_nmem.txt": "628796e195391501591859f55e249cca70e8fcaa7ceb33aac1d753fbfe4d8a4c",
}


def test_shipped_lists_are_the_published_ones() -> None:
    for name, digest in SHA256.items():
        assert hashlib.sha256((benchmark_dir() / name).read_bytes()).hexdigest() == digest
        assert digest in (benchmark_dir() / "README.md").read_text()


def test_suites() -> None:
    sd1 = load_suite("sd1")
    assert (sd1["label"] == 1).sum() == 500 and (sd1["label"] == 0).sum() == 500
    assert sd1["prompt_id"].iloc[0] == "sd1_mem.txt:0" and sd1["prompt"].iloc[3].startswith('"Watch: Passion Pit')
    sd2 = load_suite("sd2")
    assert (sd2["label"] == 1).sum() == 219 and (sd2["label"] == 0).sum() == 500
    small = load_suite("sd1", limit=7)
    assert small["label"].value_counts().to_dict() == {1.0: 7, 0.0: 7}
    assert small.equals(load_suite("sd1", limit=7))  # a seeded sample, kept in file order
    assert list(small["label"]) == [1.0] * 7 + [0.0] * 7


def test_default_suite_and_missing_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_suite(ModelProfile(name="demo", source="x")) == "demo"
    assert default_suite(ModelProfile(name="sd-v2", source="x", prediction_type="v_prediction")) == "sd2"
    assert default_suite(ModelProfile(name="sd-v1-4", source="x")) == "sd1"
    monkeypatch.setenv("MEMSCAN_DATA_DIR", str(tmp_path))
    with pytest.raises(InputError, match="demo"):
        load_suite("demo")
    with pytest.raises(InputError, match="suites"):
        load_suite(str(tmp_path / "nope.csv"))


def _synthetic_suite(path: Path) -> Path:
    """Labelled prompts in the demo's format (prompt, label, kind)."""
    adjectives = ("quiet", "golden", "hidden", "broken")
    memorized = [f"the {a} {n} of lindale" for a in adjectives for n in ("harbour", "tower")]
    clean = [f"a {c} {s}" for c in ("red", "green", "blue", "teal") for s in ("circle", "square", "ring")]
    rows = [(p, "memorized", "verbatim") for p in memorized] + [(p, "not_memorized", "generic") for p in clean]
    pd.DataFrame(rows, columns=["prompt", "label", "kind"]).to_csv(path, index=False)
    return path


def test_run_bench_and_outputs_round_trip(tiny_model: ScoringModel, tmp_path: Path) -> None:
    suite = _synthetic_suite(tmp_path / "prompts.csv")
    name, results = run_bench(
        tiny_model, methods=["anisotropy", "wen", "alignment"], suite=str(suite), n_noise=2, batch_size=4,
        out_dir=tmp_path / "out",
    )
    assert name == str(suite) and [r.method for r in results] == ["anisotropy", "wen", "alignment"]
    for result in results:
        assert result.evaluation.n_memorized == 8 and result.evaluation.n_not_memorized == 12
        assert 0 <= result.evaluation.auc <= 1 and result.seconds_per_prompt > 0
    assert [r.unet_evals_per_prompt for r in results] == [4, 2, 2]
    files = sorted((tmp_path / "out").glob("*.parquet"))
    assert [f.stem for f in files] == ["alignment", "anisotropy", "wen"]
    rows = evaluate_files(files, tmp_path / "out" / "labels.csv")
    by_name = {r["name"]: r for r in rows}
    for result in results:
        assert by_name[result.method]["auc"] == pytest.approx(result.evaluation.auc)
        assert by_name[result.method]["tpr_at_fpr"] == result.evaluation.to_dict()["tpr_at_fpr"]


def test_bench_command(tiny_model_dir: Path, tmp_path: Path) -> None:
    suite = _synthetic_suite(tmp_path / "prompts.csv")
    report = tmp_path / "bench.html"
    result = CliRunner().invoke(app, [
        "bench", "--model", str(tiny_model_dir), "--suite", str(suite), "--methods", "anisotropy,norm,sharpness",
        "--limit", "5", "--json", "--report", str(report),
    ])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["method"] for r in out["results"]] == ["anisotropy", "norm", "sharpness"]
    assert all(r["n_memorized"] == 5 and r["n_not_memorized"] == 5 and r["failed"] == 0 for r in out["results"])
    assert {"0.01", "0.03"} == set(out["results"][0]["tpr_at_fpr"])
    assert "TPR@1%" in result.stderr and "s/prompt" in result.stderr
    assert report.read_text().count("data:image/png;base64,") >= 4


def test_profile_threshold_applies_to_its_own_method_only() -> None:
    from memscan.config import DetectSettings
    from memscan.detect import applicable_threshold

    def threshold(profile: ModelProfile, method: str, n_noise: int) -> float | None:
        return applicable_threshold(DetectSettings(n_noise=n_noise), profile, method)

    plain = ModelProfile(name="m", source="x", threshold=1.5)
    assert threshold(plain, "anisotropy", 1) == 1.5 and threshold(plain, "wen", 1) is None
    calibrated = ModelProfile(name="m", source="x", threshold=0.2, calibration={"method": "sharpness", "n_noise": 4})
    assert threshold(calibrated, "sharpness", 4) == 0.2
    assert threshold(calibrated, "sharpness", 1) is None
    assert threshold(calibrated, "anisotropy", 4) is None
