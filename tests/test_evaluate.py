"""Metrics against scikit-learn and brute force; labels; calibration (weights, threshold, profile)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm as gaussian
from sklearn.metrics import roc_auc_score, roc_curve

from memscan.errors import InputError, UsageError
from memscan.evaluate import (
    attach_labels,
    calibrate,
    calibrated_profile,
    clean_threshold,
    evaluate,
    evaluate_frame,
    fit_weights,
    min_clean_prompts,
    parse_labels,
    profile_to_toml,
    write_profile,
)
from memscan.models.profiles import ModelProfile, load_profile_file


def _random_case(seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(300) < 0.3).astype(float)
    scores = rng.normal(size=300) + 1.2 * labels
    return labels, (np.round(scores, 1) if ties else scores)


def _brute_best_tpr_below(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """Max TPR over every threshold `score >= θ` whose FPR is strictly below the target."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    best = 0.0
    for theta in np.unique(scores):
        if (neg >= theta).mean() < target:
            best = max(best, (pos >= theta).mean())
    return best


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_sklearn_and_brute_force(seed: int, ties: bool) -> None:
    labels, scores = _random_case(seed, ties)
    result = evaluate(labels, scores, targets=(0.01, 0.03, 0.1))
    assert result.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    pos, neg = scores[labels == 1], scores[labels == 0]
    mann_whitney = ((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
    assert result.auc == pytest.approx(mann_whitney, abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores)
    for target in (0.01, 0.03, 0.1):
        closest = result.point(target, "closest")
        gap = np.abs(fpr - target)
        reference = tpr[np.argmin(gap)]  # the reference code's formula: the first of equally close points
        if (gap == gap.min()).sum() == 1:
            assert closest.tpr == reference  # no tie: exactly the reference's point
        else:
            assert closest.tpr == tpr[gap == gap.min()].max() >= reference  # a tie: its highest TPR
        below = result.point(target, "below")
        assert below.tpr == tpr[np.where(fpr < target)[0][-1]]  # Wen et al.'s formula
        assert below.tpr == pytest.approx(_brute_best_tpr_below(labels, scores, target))
        assert below.fpr < target
        for point in (closest, below):  # memscan's flag rule reproduces every reported point
            flagged = scores > point.threshold
            assert flagged[labels == 1].mean() == pytest.approx(point.tpr)
            assert flagged[labels == 0].mean() == pytest.approx(point.fpr)
    assert result.n_memorized == labels.sum() and result.n_not_memorized == (1 - labels).sum()


def test_closest_may_exceed_the_target_and_below_never_does() -> None:
    # ROC (drop_intermediate): (0, 0) (0, 1/3) (0.05, 1/3) (0.05, 1) (1, 1)
    labels = np.r_[np.ones(3), np.zeros(20)]
    scores = np.r_[[5.0, 4.0, 1.5, 4.5], np.linspace(0, 1, 19)]
    result = evaluate(labels, scores, targets=(0.04,))
    closest, below = result.point(0.04, "closest"), result.point(0.04, "below")
    assert closest.fpr == pytest.approx(0.05)  # 5% is closer to 4% than 0% is: above the target
    assert closest.tpr == 1.0  # of the two points at that FPR the higher (the reference's argmin: 1/3)
    assert (below.fpr, below.tpr) == (0.0, pytest.approx(1 / 3))


def test_closest_takes_the_highest_tpr_among_equally_close_points() -> None:
    """A perfect separator: ROC (0, 0) (0, 1) (1, 1); (0, 0) and (0, 1) are equally close to 1%
    FPR, and the reference's argmin took (0, 0): TPR 0 next to AUC 1."""
    labels = np.r_[np.ones(5), np.zeros(200)]
    scores = np.r_[np.linspace(2, 3, 5), np.linspace(0, 1, 200)]
    result = evaluate(labels, scores)
    assert result.auc == 1.0
    for target in (0.01, 0.03):
        closest = result.point(target, "closest")
        assert (closest.tpr, closest.fpr) == (1.0, 0.0)
        assert 1.0 < closest.threshold < 2.0  # the flag rule reproduces it


def test_closest_without_ties_is_the_reference_argmin() -> None:
    """Where one ROC point is strictly closest (here a diagonal step: a memorized and a clean prompt
    share a score), memscan takes the reference's argmin point."""
    labels = np.r_[np.ones(2), np.zeros(100)]
    scores = np.r_[[97.0, 50.0], np.arange(100.0)]  # ROC (0,0) (.01,0) (.02,0) (.03,.5) (.49,.5) (.5,1) (1,1)
    fpr, tpr, _ = roc_curve(labels, scores)
    for target, expected in ((0.03, (0.5, 0.03)), (0.045, (0.5, 0.03)), (0.3, (0.5, 0.49))):
        gap = np.abs(fpr - target)
        assert (gap == gap.min()).sum() == 1
        closest = evaluate(labels, scores, targets=(target,)).point(target, "closest")
        assert (closest.tpr, closest.fpr) == (tpr[np.argmin(gap)], fpr[np.argmin(gap)]) == expected


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0], [], [np.nan, 1, 1]])
def test_one_class_is_a_clear_input_error(labels: list[float]) -> None:
    with pytest.raises(InputError, match="both memorized and not-memorized"):
        evaluate(labels, np.arange(len(labels), dtype=float))


def test_bad_targets_and_conventions_are_usage_errors() -> None:
    for target in (0, 1, -0.1):
        with pytest.raises(UsageError):
            evaluate([1, 0, 1, 0], [1, 2, 3, 4], targets=(target,))


def test_nonfinite_and_unlabelled_rows_are_excluded() -> None:
    result = evaluate([1, 0, np.nan, 1, 0], [2.0, 1.0, 5.0, np.nan, 0.5])
    assert (result.n_memorized, result.n_not_memorized, result.n_excluded) == (1, 2, 2)
    frame = pd.DataFrame({"score": [2.0, 1.0, 3.0, 0.1], "label": [1, 0, 1, 0],
                          "status": ["ok", "ok", "error", "ok"]})
    (only,) = evaluate_frame(frame)
    assert only.n_memorized == 1 and only.n_excluded == 1 and only.auc == 1.0


def test_parse_labels() -> None:
    got = parse_labels(["memorized", "not_memorized", "1", 0, True, "False", None, "", "Clean", np.nan])
    np.testing.assert_array_equal(got, [1, 0, 1, 0, 1, 0, np.nan, np.nan, 0, np.nan])
    with pytest.raises(InputError, match="unknown label values 'maybe'"):
        parse_labels(["1", "maybe"])


def test_attach_labels_by_id_then_by_prompt() -> None:
    scores = pd.DataFrame({"prompt_id": ["f.csv:0", "f.csv:1", "f.csv:2"], "prompt": ["a", "b", "c"]})
    by_id = pd.DataFrame({"prompt_id": ["f.csv:0", "f.csv:2"], "prompt": ["x", "y"], "label": [1.0, 0.0]})
    np.testing.assert_array_equal(attach_labels(scores, by_id)["label"], [1, np.nan, 0])
    by_text = pd.DataFrame({"prompt_id": ["g:0", "g:1", "g:2"], "prompt": ["c", "b", "a"], "label": [1.0, 0.0, 0.0]})
    np.testing.assert_array_equal(attach_labels(scores, by_text)["label"], [0, 0, 1])
    clash = pd.DataFrame({"prompt_id": ["g:0", "g:1"], "prompt": ["a", "a"], "label": [1.0, 0.0]})
    with pytest.raises(InputError, match="conflicting labels"):
        attach_labels(scores, clash)
    with pytest.raises(InputError, match="no scored row matches"):
        attach_labels(scores, pd.DataFrame({"prompt_id": ["z"], "prompt": ["z"], "label": [1.0]}))


# ------------------------------------------------------------------------------------ calibration


def test_clean_threshold_bounds_the_true_fpr_with_the_stated_confidence() -> None:
    """Clean scores ~ N(0, 1), so the true FPR of a threshold is 1 - Φ(t); over 200 calibration draws
    it exceeds the target in at most about 1 - confidence of them, and never on the draw itself."""
    target, confidence, exceed = 0.01, 0.9, 0
    for seed in range(200):
        clean = np.random.default_rng(seed).normal(size=1000)
        threshold, guaranteed = clean_threshold(clean, target, confidence)
        assert guaranteed and (clean > threshold).mean() <= target
        exceed += gaussian.sf(threshold) > target
    assert exceed / 200 <= 1 - confidence + 0.05


def test_clean_threshold_with_too_few_prompts_takes_the_maximum() -> None:
    assert min_clean_prompts(0.01, 0.9) == 230
    clean = np.arange(100.0)
    threshold, guaranteed = clean_threshold(clean, 0.01, 0.9)
    assert not guaranteed and 99.0 < threshold <= 99.0 + 1e-3 * 99  # just above the largest clean score
    with pytest.raises(InputError, match="known-clean"):
        clean_threshold(np.array([]), 0.01)


def _binomial_m(n: int, target: float, confidence: float) -> int:
    """The number of clean scores allowed above the threshold, straight from the definition."""
    from scipy.stats import binom

    return max(m for m in range(n) if binom.cdf(m, n, target) <= 1 - confidence)


def _nudged(values: np.ndarray, index: int, ulps: int) -> np.ndarray:
    """`values` (float32) with one entry moved by `ulps` units in the last place."""
    out = values.astype(np.float32).copy()
    for _ in range(abs(ulps)):
        out[index] = np.nextafter(out[index], np.float32(np.inf if ulps > 0 else -np.inf))
    return out


@pytest.mark.parametrize("n_clean", [2000, 230, 100])
def test_calibrated_threshold_sits_in_the_gap_above_the_chosen_clean_score(n_clean: int) -> None:
    """The threshold is not ON a calibration score: moving the chosen clean score a few float32 ulps
    either way (a thread count's rounding) flips no flag, and exactly m clean scores stay above it."""
    frame = _synthetic_terms(4, n_clean=n_clean).drop(columns=["norm", "alignment"])
    frame["score"] = frame["score"].astype(np.float32)
    result = calibrate(frame, fit=False)
    scores, labels = frame["score"].to_numpy(), frame["label"].to_numpy()
    clean = np.sort(scores[labels == 0])
    m = _binomial_m(n_clean, 0.01, 0.9) if n_clean >= 230 else 0
    chosen = clean[n_clean - 1 - m]
    assert result.guaranteed == (n_clean >= 230)
    assert int((clean > result.threshold).sum()) == m  # the binomial guarantee's count, unchanged
    assert result.threshold > chosen
    gap = scores[scores > chosen].min() - chosen  # to the next labelled score, memorized or clean
    assert result.threshold - chosen >= min(0.5e-3 * np.abs(scores).max(), gap / 4) * (1 - 1e-6)
    assert chosen + gap - result.threshold >= gap / 2 * (1 - 1e-6)
    flags = scores > np.float32(result.threshold)
    at = int(np.flatnonzero((scores == chosen) & (labels == 0))[0])
    for ulps in (-3, -1, 1, 3):
        nudged = _nudged(scores, at, ulps)
        np.testing.assert_array_equal(nudged > np.float32(result.threshold), flags)
        again = calibrate(frame.assign(score=nudged), fit=False)  # calibrated on the nudged scores
        np.testing.assert_array_equal(scores > np.float32(again.threshold), flags)
    rounding = scores * (1 + np.random.default_rng(0).uniform(-1e-6, 1e-6, scores.size)).astype(np.float32)
    np.testing.assert_array_equal(rounding > np.float32(result.threshold), flags)  # 1e-6 relative noise everywhere


def test_threshold_splits_a_small_gap_and_steps_a_little_over_a_large_one() -> None:
    """Next labelled score (here memorized) close above the chosen clean one: the threshold lies in the
    middle half of the gap. Far above: a step of 1e-3 of the largest |score|, as a short decimal,
    not the midpoint (which would cost TPR on new memorized prompts for nothing)."""
    clean = np.arange(300, dtype=np.float64)
    assert _binomial_m(300, 0.01, 0.9) == 0  # 0.99^300 = 0.049 <= 0.1, and with one more it is 0.198
    threshold, guaranteed = clean_threshold(clean, 0.01, 0.9, others=np.array([299.001]))
    assert guaranteed and 299.00025 <= threshold <= 299.0005
    far, _ = clean_threshold(clean, 0.01, 0.9, others=np.array([1000.0]))
    assert 299.5 <= far <= 300.0 and repr(far) == "300.0"  # step 1e-3 * 1000, rounded to a short decimal
    tied, _ = clean_threshold(np.r_[clean, 299.0], 0.01, 0.9)  # two clean prompts share the top score
    assert tied > 299.0 and (np.r_[clean, 299.0] > tied).sum() == 0


def _synthetic_terms(seed: int, n_mem: int = 60, n_clean: int = 2000) -> pd.DataFrame:
    """norm and alignment where memorization raises both, alignment twice as strongly per unit."""
    rng = np.random.default_rng(seed)
    label = np.r_[np.ones(n_mem), np.zeros(n_clean)]
    norm = rng.normal(10, 1, label.size) + 1.5 * label
    alignment = rng.normal(0, 0.5, label.size) + 1.5 * label
    return pd.DataFrame({"norm": norm, "alignment": alignment, "label": label,
                         "score": norm + alignment, "status": "ok"}).astype({"norm": "float32", "alignment": "float32"})


def test_fit_weights_recovers_the_direction() -> None:
    frame = _synthetic_terms(0, n_mem=2000)
    w_norm, w_align = fit_weights(frame["norm"].to_numpy(), frame["alignment"].to_numpy(), frame["label"].to_numpy())
    assert w_norm == 1.0
    assert w_align == pytest.approx(4.0, rel=0.2)  # LDA direction: mean shift / variance = 1.5/1 and 1.5/0.25


def test_calibrated_threshold_holds_on_held_out_clean_prompts(tmp_path: Path) -> None:
    frame = _synthetic_terms(1, n_clean=6000)
    result = calibrate(frame, target_fpr=0.01, holdout=0.5, seed=0)
    assert result.fitted and result.guaranteed and result.n_clean == 3000
    assert result.fpr <= 0.01
    assert result.holdout is not None and result.holdout["n_clean"] == 3000
    assert result.holdout["fpr"] <= 0.01
    assert result.tpr > 0.5 and result.holdout["tpr"] > 0.5


def test_no_fit_keeps_the_scores_weights() -> None:
    frame = _synthetic_terms(2)
    result = calibrate(frame, fit=False, weights=(1.0, 1.0))
    assert (result.w_norm, result.w_align, result.fitted) == (1.0, 1.0, False)
    plain = calibrate(frame.drop(columns=["norm", "alignment"]), fit=False)
    assert plain.w_norm is None and plain.threshold == pytest.approx(result.threshold, rel=1e-6)
    with pytest.raises(InputError, match="norm"):
        calibrate(frame.drop(columns=["norm"]), fit=True)


def test_profile_round_trips_through_toml(tmp_path: Path) -> None:
    base = ModelProfile(name="x", source=str(tmp_path), description='quote " and \\ and é', w_norm=1.0, w_align=2.0)
    result = calibrate(_synthetic_terms(3), target_fpr=0.05)
    facts = {"method": "anisotropy", "n_noise": 1, "seed": 51, "dtype": "float32", "v_convention": "epsilon"}
    profile = calibrated_profile(base, result, "mine", facts)
    path = write_profile(profile, tmp_path / "mine.toml")
    loaded = load_profile_file(path)
    assert loaded == profile
    assert loaded.threshold == result.threshold and loaded.w_align == result.w_align
    assert loaded.calibration["target_fpr"] == 0.05 and loaded.calibration["n_noise"] == 1
    assert "[scoring]" in profile_to_toml(profile) and "[calibration]" in profile_to_toml(profile)
    assert "[mitigation]" not in profile_to_toml(profile)  # the default sentence vector is not written
    (tmp_path / "judge").mkdir()
    judged = replace(profile, text_similarity=str(tmp_path / "judge"))
    assert load_profile_file(write_profile(judged, tmp_path / "mine.toml")) == judged
    assert '[mitigation]\ntext_similarity = "' in (tmp_path / "mine.toml").read_text()
    tokens = replace(profile, text_similarity="tokens")
    assert load_profile_file(write_profile(tokens, tmp_path / "mine.toml")) == tokens


# ------------------------------------------------------------------------------------ commands

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "ring"]


def _clean_prompts(start: int, count: int) -> list[str]:
    """Disjoint slices of one shuffled pool: calibration and held-out prompts are exchangeable."""
    combos = [f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in COLOURS if b != c]
    order = np.random.default_rng(0).permutation(len(combos))
    return [combos[i] for i in order[start : start + count]]


def _labelled_csv(path: Path, clean: list[str], memorized: list[str]) -> Path:
    rows = [(p, "not_memorized") for p in clean] + [(p, "memorized") for p in memorized]
    pd.DataFrame(rows, columns=["prompt", "label"]).to_csv(path, index=False)
    return path


def test_evaluate_calibrate_detect_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    """detect -> evaluate -> calibrate (profile TOML) -> detect --model PROFILE flags, and the
    threshold keeps the FPR within the target on clean prompts it never saw."""
    import json

    from typer.testing import CliRunner

    from memscan.cli import app

    runner = CliRunner()
    memorized = [f"the {a} {n} of lindale" for a in ("quiet", "golden", "hidden", "broken", "silver", "ancient")
                 for n in ("harbour", "tower")]
    prompts = _labelled_csv(tmp_path / "prompts.csv", _clean_prompts(0, 40), memorized)
    scores = tmp_path / "scores.parquet"
    result = runner.invoke(app, ["detect", str(prompts), "-o", str(scores), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output

    result = runner.invoke(app, ["evaluate", str(scores), "--labels", str(prompts), "--json", "--column", "score",
                                 "--column", "norm"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["anisotropy", "anisotropy:norm"]
    assert rows[0]["n_memorized"] == 12 and rows[0]["n_not_memorized"] == 40
    assert set(rows[0]["tpr_at_fpr"]) == {"0.01", "0.03"}
    assert set(rows[0]["tpr_at_fpr"]["0.01"]) == {"closest", "below"}
    assert "closest" in result.stderr and "below" in result.stderr

    profile = tmp_path / "tiny-calibrated.toml"
    result = runner.invoke(app, ["calibrate", str(scores), "--labels", str(prompts), "-o", str(profile),
                                 "--target-fpr", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    calibration = json.loads(result.stdout)
    assert calibration["guaranteed"] and calibration["fpr"] <= 0.2 and calibration["fitted"]

    held_out = _labelled_csv(tmp_path / "held_out.csv", _clean_prompts(40, 60), [])
    flagged_scores = tmp_path / "held_out.parquet"
    result = runner.invoke(app, ["detect", str(held_out), "-o", str(flagged_scores), "--model", str(profile)])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(flagged_scores)
    assert frame["flagged"].notna().all()
    np.testing.assert_array_equal(frame["flagged"].to_numpy(bool), frame["score"].to_numpy() > calibration["threshold"])
    assert frame["flagged"].mean() <= 0.2, frame["flagged"].mean()
    loaded = load_profile_file(profile)
    assert loaded.threshold == calibration["threshold"] and loaded.w_norm == calibration["w_norm"]
    assert Path(loaded.source) == tiny_model_dir


def test_commands_fail_with_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from memscan.cli import app

    runner = CliRunner()
    prompts = _labelled_csv(tmp_path / "p.csv", _clean_prompts(0, 4), [])
    scores = tmp_path / "s.parquet"
    detected = runner.invoke(app, ["detect", str(prompts), "-o", str(scores), "--model", str(tiny_model_dir)])
    assert detected.exit_code == 0, detected.output
    result = runner.invoke(app, ["evaluate", str(scores), "--labels", str(prompts)])
    assert result.exit_code == 4 and "both memorized and not-memorized" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(app, ["evaluate", str(scores)])
    assert result.exit_code == 4 and "--labels" in result.stderr
    result = runner.invoke(app, ["evaluate", str(scores), "--labels", str(prompts), "--target-fpr", "2"])
    assert result.exit_code in (2, 4)


@pytest.mark.skipif(not (Path(__file__).parents[1] / "data/demo/model/model_index.json").is_file(),
                    reason="the demo model is not built")
def test_calibrate_on_the_demo_model_holds_on_held_out_prompts(tmp_path: Path) -> None:
    """The demo's labelled prompts: fit on 70%, the threshold keeps FPR <= 1% on the 30% held out."""
    from memscan.config import DetectSettings
    from memscan.detect import detect
    from memscan.evaluate import calibrate_scores
    from memscan.models.loading import resolve_profile
    from memscan.paths import demo_dir

    prompts = demo_dir() / "prompts.csv"
    scores = tmp_path / "demo.parquet"
    detect(prompts, scores, DetectSettings(model="demo", device="cpu"))
    shipped = pd.read_parquet(scores)  # flagged with the shipped profile's threshold
    memorized = pd.read_csv(prompts)["label"].eq("memorized").to_numpy()
    np.testing.assert_array_equal(shipped["flagged"].to_numpy(bool), memorized)  # the 54, and no clean prompt
    threshold = resolve_profile("demo").threshold
    gap = np.abs(shipped["score"].to_numpy(np.float64) - threshold).min()
    assert gap > 1e-4 * shipped["score"].abs().max()  # no score within rounding of it: thread counts flip nothing
    profile, result = calibrate_scores(scores, tmp_path / "demo-cal.toml", labels_path=prompts, holdout=0.3)
    assert result.guaranteed and result.holdout is not None
    assert result.holdout["n_clean"] == 100 and result.holdout["fpr"] <= 0.01
    assert result.fpr <= 0.01 and profile.threshold == result.threshold
    flagged = detect(prompts, None, DetectSettings(model=str(tmp_path / "demo-cal.toml"), device="cpu")).scores
    clean = pd.read_csv(prompts)["label"].eq("not_memorized").to_numpy()
    assert flagged["flagged"].notna().all() and flagged["flagged"].to_numpy(bool)[clean].mean() <= 0.01


# ------------------------------------------------------------------------------------ caption families


def test_caption_groups_find_families_and_keep_unrelated_captions_apart() -> None:
    from memscan.evaluate import caption_groups

    prompts = [
        "a red sailboat on the rocks at night",          # 0: family A (one word differs: Jaccard 7/9)
        "a photo of a cat",                              # 1
        "framed canvas print of the majestic tiger, a small orange square",  # 2: family B
        "a blue sailboat on the rocks at night",         # 3: A
        "portrait 12 of a smiling woman.",               # 4: family C (same caption without digits/punctuation)
        "premium canvas print of the majestic tiger, a small orange square",  # 5: B
        "a photo of a dog",                              # 6: 3/5 = 0.6 < 0.7: its own
        "Portrait 7 of a smiling woman",                 # 7: C
        "the misty village of hilltop",                  # 8
        "the misty village of elmstead",                 # 9: 4/6 < 0.7: its own
        "A GREEN SAILBOAT ON THE ROCKS AT NIGHT!",       # 10: A
        "",                                              # 11
    ]
    np.testing.assert_array_equal(caption_groups(prompts), [0, 1, 2, 0, 3, 2, 4, 3, 5, 6, 0, 7])
    np.testing.assert_array_equal(caption_groups(list(reversed(prompts)))[::-1] == 0, [False] * 11 + [True])
    assert len(set(caption_groups(prompts, jaccard=0.5))) < 8  # a looser rule joins more


def test_caption_groups_match_brute_force_single_linkage() -> None:
    """Prefix filtering finds every pair: the same families as comparing all pairs, on captions of a
    small vocabulary (many near pairs, long chains)."""
    from memscan.evaluate import caption_groups, caption_words

    rng = np.random.default_rng(3)
    vocabulary = ["a", "the", "of", "red", "blue", "boat", "rocks", "night", "sky", "cat", "at", "on", "big"]
    prompts = [" ".join(rng.choice(vocabulary, rng.integers(1, 9))) for _ in range(300)]
    words = [set(caption_words(p)) for p in prompts]
    parent = list(range(len(prompts)))

    def root(i: int) -> int:
        return i if parent[i] == i else root(parent[i])

    for i in range(len(prompts)):
        for j in range(i):
            if len(words[i] & words[j]) >= 0.7 * len(words[i] | words[j]) - 1e-9:
                parent[root(i)] = root(j)
    expected = pd.factorize(pd.Series([root(i) for i in range(len(prompts))]))[0]
    np.testing.assert_array_equal(caption_groups(prompts), expected)
    assert 5 < len(set(expected)) < 250  # neither all apart nor all one


def _families(seed: int, n_families: int, size: int, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Clean scores in families: one family effect N(0, 1) shared by `size` members, small noise each."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(size=n_families)
    scores = np.repeat(effect, size) + rng.normal(0, spread, n_families * size)
    return scores, np.repeat(np.arange(n_families), size)


def test_the_group_guarantee_holds_where_the_prompt_level_one_overstates() -> None:
    """250 caption families of 20 near-identical prompts: counted as 5000 exchangeable prompts, the
    binomial guarantee (FPR <= 1% on new prompts with confidence 0.9) fails in a third of the
    calibration draws, not 10%; counted over families, at most 1% of new families have a member
    above the threshold in at least 90% of draws, as stated."""
    fresh, fresh_groups = _families(10_000, 20_000, 20)
    fresh_max = pd.Series(fresh).groupby(fresh_groups).max().to_numpy()
    prompt_level = group_level = 0
    draws = 150
    for seed in range(draws):
        scores, groups = _families(seed, 250, 20)
        by_prompt, _ = clean_threshold(scores, 0.01, 0.9)
        by_group, guaranteed = clean_threshold(scores, 0.01, 0.9, groups=groups)
        assert guaranteed and by_group >= by_prompt
        assert (pd.Series(scores > by_group).groupby(groups).any()).mean() <= 0.01  # on the calibration draw
        prompt_level += (fresh > by_prompt).mean() > 0.01  # new prompts, from new families
        group_level += (fresh_max > by_group).mean() > 0.01  # new families with a member above
    assert prompt_level / draws > 0.25, prompt_level  # 50 of 150 draws
    assert group_level / draws <= 0.1, group_level  # 10 of 150


def test_group_split_keeps_groups_whole_and_stratifies_as_far_as_groups_allow() -> None:
    from memscan.evaluate import group_split

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 400)
    groups = np.repeat(np.arange(400), sizes)
    labels = np.repeat((np.arange(400) < 60).astype(float), sizes)  # the first 60 groups memorized
    for seed in range(5):
        held = group_split(labels, groups, 0.3, seed)
        assert (pd.Series(held).groupby(groups).nunique() == 1).all()  # no group on both sides
        for value in (0, 1):
            share = held[labels == value].mean()
            assert abs(share - 0.3) < 0.02, (value, share)
    np.testing.assert_array_equal(group_split(labels, groups, 0.3, 1), group_split(labels, groups, 0.3, 1))
    assert not np.array_equal(group_split(labels, groups, 0.3, 1), group_split(labels, groups, 0.3, 2))


SYLLABLES = ["ka", "lo", "mi", "nu", "re", "so", "ti", "va", "be", "du", "fe", "go", "hi", "ju"]


def _family_scores(seed: int = 0, *, n_single: int = 2000, n_rocks: int = 30, rocks: tuple[float, float] = (2.3, 0.15),
                   n_mem: int = 60) -> pd.DataFrame:
    """Labelled scores: `n_single` unrelated clean captions ~ N(0, 1), one clean caption family
    "a WORD on the rocks at night" above most of them, and memorized prompts far above all."""
    import itertools

    rng = np.random.default_rng(seed)
    words = rng.permutation(["".join(p) for p in itertools.product(SYLLABLES, repeat=3)])
    rows = [(" ".join(rng.choice(words[:-300], 5, replace=False)) + f" scene {i}", f"s{i}", rng.normal(), 0)
            for i in range(n_single)]
    rows += [(f"a {words[-1 - i]} on the rocks at night", "rocks", rng.normal(*rocks), 0) for i in range(n_rocks)]
    rows += [(f"the {words[-100 - i]} of {words[-200 - i]}", f"m{i}", rng.normal(5, 0.5), 1) for i in range(n_mem)]
    frame = pd.DataFrame(rows, columns=["prompt", "family", "score", "label"])
    return frame.assign(score=frame["score"].astype(np.float32), label=frame["label"].astype(float), status="ok")


def test_calibrate_with_groups_reports_prompt_and_family_rates() -> None:
    """The family above most others lands on the held-out side: by prompt its FPR runs over the
    target (what a row split hides), by family it stays within; the warning names the family."""
    frame = _family_scores()
    rows = calibrate(frame, fit=False, holdout=0.5, seed=0)  # a row split: the family on both sides
    assert rows.groups is None and rows.group_fpr is None and rows.holdout["fpr"] <= 0.01
    grouped = calibrate(frame, fit=False, holdout=0.5, seed=0, group_column="family")
    assert grouped.groups == "family" and grouped.guaranteed
    assert grouped.n_clean_groups == grouped.n_clean == 1015  # every fit-side family is one prompt here
    held = grouped.holdout
    assert held["n_clean"] == 985 + 30 and held["n_clean_groups"] == 985 + 1  # the family whole, on this side
    assert grouped.group_fpr <= 0.01 and held["group_fpr"] <= 0.01
    assert held["fpr"] > 0.01  # 14 of 1015 prompts: 8 of them from the one family
    (warning,) = grouped.warnings
    assert warning.startswith("holdout side: 8 of the 14 clean prompts above the threshold come from one caption "
                              "family")
    assert "on the rocks at night" in warning
    auto = calibrate(frame, fit=False, holdout=0.5, seed=0, auto_groups=True)  # the same families, found
    assert auto.groups == "auto" and auto.threshold == grouped.threshold and auto.holdout == held
    with pytest.raises(UsageError, match="not both"):
        calibrate(frame, fit=False, group_column="family", auto_groups=True)


def test_clustered_false_positives_warn_without_groups_too() -> None:
    """No groups asked for: the guarantee counts prompts as before, but when most flagged clean
    prompts come from one caption family (found from the text) the calibration says so."""
    from memscan.evaluate import false_positive_cluster

    frame = _family_scores(n_rocks=40, rocks=(3.0, 0.1))
    result = calibrate(frame, fit=False)
    assert result.groups is None and result.fpr <= 0.01
    (warning,) = result.warnings
    assert warning.startswith("calibration side: 14 of the 14 clean prompts above the threshold come from one caption "
                              "family (40 clean prompts, 2.0% of them")
    assert "--group-column or --groups auto" in warning
    assert calibrate(_family_scores(), fit=False).warnings == ()  # spread over unrelated prompts: quiet
    scores, labels = np.arange(30.0), np.zeros(30)  # 27, 28, 29 above 26.5
    three = np.r_[np.arange(27), [27, 27, 27]]
    assert false_positive_cluster(scores, labels, three, 26.5).startswith("3 of the 3 clean prompts above")
    assert false_positive_cluster(scores, labels, np.r_[np.arange(28), [28, 28]], 26.5).startswith("2 of the 3")
    assert false_positive_cluster(scores, labels, np.arange(30), 26.5) is None  # three families, one each
    assert false_positive_cluster(scores, labels, np.arange(30) // 15, 26.5) is None  # all 3 from half the prompts
    assert false_positive_cluster(scores, labels, three, 27.5) is None  # 2 above: too few to call a cluster


def test_calibrate_command_with_a_group_column(tmp_path: Path) -> None:
    """`calibrate --group-column` reads the families from the labels file, writes the group-level
    numbers into the profile, and prints both rates and the cluster warning."""
    import json

    from typer.testing import CliRunner

    from memscan.cli import app
    from memscan.io.scores import scores_schema, to_table, write_scores

    frame = _family_scores()
    frame["prompt_id"] = [f"p{i}" for i in range(len(frame))]
    frame["norm"], frame["alignment"] = frame["score"], np.float32(0.0)
    frame["flagged"], frame["truncated"], frame["error"] = None, False, None
    facts = {"model": "sd-v1-4", "method": "anisotropy", "n_noise": 2, "seed": 7, "w_norm": 1.0, "w_align": 0.0}
    scores = tmp_path / "scores.parquet"
    write_scores(to_table(frame.drop(columns=["label", "family"]), scores_schema(("norm", "alignment", "score")),
                          facts), scores)
    labels = tmp_path / "labels.csv"
    frame[["prompt_id", "prompt", "label", "family"]].to_csv(labels, index=False)
    runner = CliRunner()
    base = ["calibrate", str(scores), "--labels", str(labels), "--no-fit", "--holdout", "0.5", "--json"]
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "g.toml"), "--group-column", "family"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["groups"] == "family" and out["n_clean_groups"] == 1015 and out["group_fpr"] <= 0.01
    assert out["holdout"]["n_clean_groups"] == 986 and out["holdout"]["group_fpr"] <= 0.01 < out["holdout"]["fpr"]
    assert "caption families (family): 0.005 of 1015 clean families have a member above the threshold" in result.stderr
    assert "memscan: warning: holdout side: 8 of the 14 clean prompts" in result.stderr
    calibration = load_profile_file(tmp_path / "g.toml").calibration
    assert calibration["groups"] == "family" and calibration["holdout_n_clean_groups"] == 986
    assert (calibration["n_noise"], calibration["seed"]) == (2, 7)
    auto = runner.invoke(app, [*base, "-o", str(tmp_path / "a.toml"), "--groups", "auto"])
    assert auto.exit_code == 0, auto.output
    assert json.loads(auto.stdout)["holdout"] == out["holdout"]
    both = runner.invoke(app, [*base, "-o", str(tmp_path / "b.toml"), "--groups", "auto", "--group-column", "family"])
    assert both.exit_code == 2 and "not both" in both.stderr
    missing = runner.invoke(app, [*base, "-o", str(tmp_path / "c.toml"), "--group-column", "nope"])
    assert missing.exit_code == 4 and "'nope'" in missing.stderr


def test_calibrate_names_the_one_clean_prompt_that_sets_the_threshold() -> None:
    # 300 clean prompts (the guarantee leaves one above the threshold from 388 on, so none here) and
    # one of them scores above most memorized ones: it alone decides the TPR, and calibrate says so
    rng = np.random.default_rng(0)
    clean, memorized = rng.normal(0.0, 1.0, 300), rng.normal(8.0, 1.0, 20)
    frame = pd.DataFrame({"score": np.r_[clean, memorized], "label": np.r_[np.zeros(300, int), np.ones(20, int)],
                          "prompt": [f"clean caption {i}" for i in range(300)] + [f"memorized {i}" for i in range(20)]})
    assert not calibrate(frame, fit=False).warnings
    frame.loc[7, "score"] = 9.5
    result = calibrate(frame, fit=False)
    assert result.tpr < 0.2
    (warning,) = [w for w in result.warnings if "sets the threshold" in w]
    assert "'clean caption 7'" in warning and "TPR would be 1.000" in warning and "from 388 clean prompts on" in warning
