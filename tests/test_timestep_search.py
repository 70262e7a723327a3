"""Choosing the DDIM steps the terms are read at: the columns reproduce detect, the choice moves
only for a real gain, and calibrate writes the chosen steps into the profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memscan.evaluate import calibrate
from memscan.methods.anisotropy import AnisotropyMethod
from memscan.models.loading import ScoringModel
from memscan.scorer import Scorer
from memscan.timestep_search import DEFAULT_GRID, choose_pair, grid_for, searched_indices, term_columns

PROMPTS = ["a red fox in snow", "a red fox in snow", "the quiet harbour of lindale", "x" * 400, "ein Fuchs 🦊 [x]"]


@pytest.mark.parametrize("kind, v_convention, norm_scale", [
    ("tiny_model", "epsilon", "none"), ("tiny_v_model", "epsilon", "none"), ("tiny_v_model", "raw", "reference-v"),
])
def test_columns_at_a_pair_reproduce_the_scorer(kind: str, v_convention: str, norm_scale: str,
                                                request: pytest.FixtureRequest) -> None:
    model: ScoringModel = request.getfixturevalue(kind)
    table = term_columns(model, PROMPTS, indices=(0, 10, 47), n_noise=2, seed=3, v_convention=v_convention,
                         norm_scale=norm_scale, batch_size=2)
    assert len(table) == len(PROMPTS) and searched_indices(table) == [0, 10, 47]
    np.testing.assert_array_equal(table.iloc[0].to_numpy(), table.iloc[1].to_numpy())  # a repeat, the same row
    for hi, lo in ((0, -3), (10, 0)):
        method = AnisotropyMethod(t_hi_index=hi, t_lo_index=lo, v_convention=v_convention, norm_scale=norm_scale)
        scored = Scorer(model, method, n_noise=2, seed=3, batch_size=4).score_texts(PROMPTS).columns
        np.testing.assert_allclose(table[f"norm_t{hi % 50}"], scored["norm"], rtol=1e-5)
        np.testing.assert_allclose(table[f"alignment_t{lo % 50}"], scored["alignment"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(table["norm_t0"], table["norm_t10"])  # the steps do differ


def _frame(rng: np.random.Generator, n_clean: int = 200, n_mem: int = 20) -> tuple[pd.DataFrame, np.ndarray]:
    labels = np.r_[np.zeros(n_clean, int), np.ones(n_mem, int)]
    frame = pd.DataFrame({f"{p}_t{i}": rng.normal(size=len(labels)) for i in (0, 25, 47)
                          for p in ("norm", "alignment")})
    return frame, labels


def test_a_separating_step_is_chosen_and_ties_keep_the_profiles_pair() -> None:
    rng = np.random.default_rng(0)
    frame, labels = _frame(rng)
    frame["norm_t0"] += 0.8 * labels  # the profile's step: some signal
    frame["norm_t25"] += 6.0 * labels  # another step: clean separation
    choice = choose_pair(frame, labels, default=(0, -3), target_fpr=0.01)
    assert (choice.t_hi_index, choice.t_lo_index) == (25, 47) and choice.tpr == 1.0 and choice.auc == 1.0
    assert choice.default_tpr < 0.6 and choice.candidates == 9
    frame["norm_t0"] = frame["norm_t25"] + 1e-3 * rng.normal(size=len(labels))  # as good, within rounding
    choice = choose_pair(frame, labels, default=(0, -3), target_fpr=0.01)
    assert (choice.t_hi_index, choice.t_lo_index) == (0, 47)


def test_two_clean_outliers_do_not_move_the_search_off_the_better_ranking() -> None:
    # step 0 ranks everything right but two clean prompts, above every memorized one; step 25 has no
    # outlier and ranks worse. The ROC at 1% FPR (3 clean of 400 may be above) and the AUC both keep
    # step 0; the TPR at calibrate's threshold (at most 1 of 400 above at confidence 0.9) is 0 there
    # and would pick step 25, a choice made by two prompts
    rng = np.random.default_rng(2)
    frame, labels = _frame(rng, 400, 20)
    frame["norm_t0"] += 6.0 * labels
    frame.loc[[0, 10], "norm_t0"] = 9.0
    frame["norm_t25"] += 3.0 * labels
    choice = choose_pair(frame, labels, default=(0, -3), target_fpr=0.01)
    assert choice.t_hi_index == 0 and choice.tpr == 1.0 and choice.auc > 0.99


def test_calibrate_reads_the_chosen_steps_on_both_sides() -> None:
    rng = np.random.default_rng(1)
    frame, labels = _frame(rng, 300, 40)
    frame["norm_t25"] += 6.0 * labels
    frame = frame.assign(label=labels, score=0.0, norm=frame["norm_t0"], alignment=frame["alignment_t47"])
    result = calibrate(frame, holdout=0.5, seed=0)
    assert (result.t_hi_index, result.t_lo_index) == (25, 47)
    assert result.tpr == 1.0 and result.holdout["tpr"] == 1.0 and result.holdout["auc"] > 0.99
    plain = calibrate(frame[["label", "score", "norm", "alignment"]], holdout=0.5, seed=0)
    assert plain.t_hi_index is None and plain.holdout["auc"] < 0.8
    with pytest.raises(Exception, match="--no-fit"):
        calibrate(frame, fit=False)


def test_calibrate_command_writes_the_searched_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    """End to end on the tiny model: the profile records the search, and detect with it reads the
    terms at the written steps."""
    from typer.testing import CliRunner

    from memscan.cli import app
    from memscan.models.profiles import load_profile_file

    words = ("harbour", "tower", "meadow", "lantern", "orchard", "bridge", "river", "garden")
    clean = [f"a {a} {w} at dawn" for a in ("small", "green", "old", "wide", "calm") for w in words]
    memorized = [f"the {a} {w} of lindale" for a in ("quiet", "golden", "hidden") for w in words[:4]]
    prompts = tmp_path / "prompts.csv"
    labels = ["not_memorized"] * len(clean) + ["memorized"] * len(memorized)
    pd.DataFrame({"prompt": clean + memorized, "label": labels}).to_csv(prompts, index=False)
    runner = CliRunner()
    scores = tmp_path / "s.parquet"
    detected = runner.invoke(app, ["detect", str(prompts), "-o", str(scores), "--model", str(tiny_model_dir)])
    assert detected.exit_code == 0, detected.output
    profile = tmp_path / "p.toml"
    result = runner.invoke(app, ["calibrate", str(scores), "--labels", str(prompts), "-o", str(profile),
                                 "--target-fpr", "0.2", "--search-timesteps", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["timestep_search"]["candidates"] == 121 and "steps t_hi" in result.stderr
    assert "searching steps: 52 prompts x 11 steps x 1 noise = 572 UNet evaluations" in result.stderr
    loaded = load_profile_file(profile)
    assert loaded.t_hi_index % 50 == out["t_hi_index"] and loaded.t_lo_index % 50 == out["t_lo_index"]
    assert loaded.calibration["search_t_hi_index"] == out["t_hi_index"]
    again = tmp_path / "again.parquet"
    assert runner.invoke(app, ["detect", str(prompts), "-o", str(again), "--model", str(profile)]).exit_code == 0
    detected = pd.read_parquet(again)
    flagged = detected["score"].to_numpy() > out["threshold"]
    assert flagged[len(clean):].mean() == pytest.approx(out["tpr"], abs=1e-9) or out["fpr"] > 0
    part = tmp_path / "part.csv"  # 10 clean prompts left unlabelled: calibrate leaves them out, so does the search
    pd.read_csv(prompts).iloc[10:].to_csv(part, index=False)
    fewer = runner.invoke(app, ["calibrate", str(scores), "--labels", str(part), "-o", str(tmp_path / "r.toml"),
                                "--target-fpr", "0.2", "--search-timesteps"])
    assert fewer.exit_code == 0, fewer.output
    assert "searching steps: 42 prompts x 11 steps x 1 noise = 462 UNet evaluations" in fewer.stderr
    no_fit = runner.invoke(app, ["calibrate", str(scores), "--labels", str(prompts), "-o", str(tmp_path / "q.toml"),
                                 "--search-timesteps", "--no-fit"])
    assert no_fit.exit_code == 2 and len(no_fit.stderr.strip().splitlines()) == 1


def test_the_grid_follows_the_schedule_and_holds_the_papers_pair(tiny_model: ScoringModel) -> None:
    assert grid_for(50) == DEFAULT_GRID and {0, 47} <= set(DEFAULT_GRID)
    assert grid_for(20) == (0, 2, 4, 6, 8, 10, 12, 14, 16, 17, 18) and grid_for(4) == (0, 1, 2, 3)
    table = term_columns(tiny_model, PROMPTS[:2], steps=20)
    assert searched_indices(table) == list(grid_for(20))
