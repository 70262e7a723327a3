"""`bench`: suites, one-command benchmark on a tiny model with synthetic labels, outputs that
`evaluate` reads back to the same numbers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
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


def _bench(model: ScoringModel, suite: Path, methods: list[str], **flags: object) -> dict[str, pd.DataFrame]:
    """Each method's scores on 2 + 2 prompts of `suite`, their run facts in `attrs["facts"]`."""
    _, results = run_bench(model, methods=methods, suite=str(suite), limit=2, n_noise=1, batch_size=4, **flags)
    scores = {}
    for result in results:
        scores[result.method] = result.scores
        scores[result.method].attrs["facts"] = result.facts
    return scores


def test_bench_weights_override_the_profile_as_in_detect(
    tiny_model: ScoringModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--w-norm/--w-align reweight anisotropy's terms (the profile says 1 and 2); the terms, `norm`
    and `wen` are the same numbers, and the methods without weights say once that they ignore them."""
    suite = _synthetic_suite(tmp_path / "prompts.csv")
    plain = _bench(tiny_model, suite, ["anisotropy", "norm", "wen"])
    aniso = plain["anisotropy"]
    assert (aniso.attrs["facts"]["w_norm"], aniso.attrs["facts"]["w_align"]) == (1.0, 2.0)
    np.testing.assert_allclose(aniso["score"], aniso["norm"] + 2 * aniso["alignment"], rtol=1e-6)
    assert "ignoring" not in caplog.text

    norm_only = _bench(tiny_model, suite, ["anisotropy", "norm", "wen"], w_align=0.0)
    aniso0 = norm_only["anisotropy"]
    assert aniso0["score"].tolist() == aniso0["norm"].tolist()  # 1 * norm + 0 * alignment
    np.testing.assert_allclose(aniso0["score"], norm_only["norm"]["score"], rtol=1e-5)  # the norm method
    np.testing.assert_allclose(aniso0["norm"], aniso["norm"], rtol=1e-6)
    np.testing.assert_allclose(norm_only["wen"]["score"], plain["wen"]["score"], rtol=1e-6)
    assert "ignoring --w-align for norm, wen (those methods have no such setting)" in caplog.text
    assert "w_align" not in norm_only["norm"].attrs["facts"]

    doubled = _bench(tiny_model, suite, ["anisotropy"], w_norm=2.0, w_align=0.0)["anisotropy"]
    assert (doubled.attrs["facts"]["w_norm"], doubled.attrs["facts"]["w_align"]) == (2.0, 0.0)
    assert doubled["score"].tolist() == (2 * doubled["norm"]).tolist()
    np.testing.assert_allclose(doubled["score"], 2 * aniso0["score"], rtol=1e-6)


def test_bench_drops_a_calibrated_threshold_only_where_the_flags_change_the_score(
    tiny_model: ScoringModel, tmp_path: Path
) -> None:
    """As in detect: explicit weights drop the anisotropy threshold (facts threshold None); `wen`
    ignores them, so its own calibrated threshold stays; --v-convention changes nothing on an epsilon model."""
    suite = _synthetic_suite(tmp_path / "prompts.csv")

    def threshold(method: str, **flags: object) -> float | None:
        profile = tiny_model.profile.with_overrides(threshold=0.5, calibration={"method": method, "n_noise": 1})
        scores = _bench(replace(tiny_model, profile=profile), suite, [method], **flags)[method]
        return scores.attrs["facts"]["threshold"]

    assert threshold("anisotropy") == 0.5
    assert threshold("anisotropy", w_norm=2.0) is None
    assert threshold("anisotropy", w_align=0.0) is None
    assert threshold("anisotropy", norm_scale="reference-v") is None
    assert threshold("anisotropy", v_convention="raw") == 0.5
    assert threshold("wen", w_norm=2.0, w_align=0.0) == 0.5


def test_bench_command_records_the_weights(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`bench --w-align 0` on a calibrated profile: anisotropy scores the norm term alone, the scores
    files record the weights and no threshold, and wen's warning is one line."""
    suite = _synthetic_suite(tmp_path / "prompts.csv")
    profile = tmp_path / "calibrated.toml"
    profile.write_text(
        f'source = "{tiny_model_dir}"\nresolution = 64\n\n[scoring]\nw_norm = 1.0\nw_align = 2.0\nthreshold = 0.5\n\n'
        '[calibration]\nmethod = "anisotropy"\nn_noise = 1\nseed = 51\n',
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "bench", "--model", str(profile), "--suite", str(suite), "--methods", "anisotropy,norm,wen", "--limit", "2",
        "--w-align", "0", "--out-dir", str(out),
    ])
    assert result.exit_code == 0, result.output
    aniso = pq.read_table(out / "anisotropy.parquet")
    facts = json.loads(aniso.schema.metadata[b"memscan"])
    assert (facts["w_norm"], facts["w_align"], facts["threshold"]) == (1.0, 0.0, None)
    frame = aniso.to_pandas()
    assert frame["score"].tolist() == frame["norm"].tolist()
    norm = pq.read_table(out / "norm.parquet").column("score").to_numpy()
    np.testing.assert_allclose(frame["score"], norm, rtol=1e-5)  # the norm method
    ignoring = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring")]
    assert ignoring == ["ignoring --w-align for norm, wen (those methods have no such setting)"]
    usage = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert all(flag in usage.stdout for flag in ("--w-norm", "--w-align", "--v-convention", "--norm-scale"))
