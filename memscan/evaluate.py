"""How good a detector is on labelled prompts, and what threshold to trust: metrics + calibration.

Metrics: ROC AUC and TPR at a target FPR under the two conventions the literature mixes up,
both read off scikit-learn's `roc_curve` (default `drop_intermediate=True`, as both papers' code):

  closest  the ROC point whose FPR is closest to the target (the anisotropy reference code,
           `argmin |fpr - target|`); its FPR may exceed the target. Among equally close points
           (the bottom and top of a vertical step, as on every perfect separator) it takes the
           highest TPR, where the reference's argmin takes the first (lowest-TPR) one and reads 0
           next to AUC 1: the two differ only on such ties;
  below    the last ROC point with FPR strictly below the target (Wen et al.).

Each point comes with the threshold that reproduces it under memscan's flag rule `score > threshold`.

Calibration: logistic regression on (norm, alignment) of labelled prompts gives the anisotropy
weights (the paper fits them on ~20 memorized prompts); the threshold is set on known-clean prompts
only, as an order statistic with a binomial guarantee: of n clean scores, at most m lie above it,
with m the largest count such that P(Binomial(n, α) <= m) <= 1 - confidence. Then, with probability
at least `confidence` over the draw of the clean prompts, the FPR on new clean prompts from the same
distribution is at most α (not only on average), and the calibration prompts' own FPR is below α.
The threshold sits in the gap just above that clean score, not on it (a threshold equal to a score
flags it or not depending on the last bit, e.g. on the thread count); a higher threshold keeps the
guarantee.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from memscan.errors import InputError, UsageError
from memscan.io.scores import STATUS_OK
from memscan.models.profiles import ModelProfile

Convention = Literal["closest", "below"]
CONVENTIONS: dict[str, str] = {
    "closest": "ROC point with FPR closest to the target (anisotropy reference code), the highest TPR among "
               "equally close points (the reference takes the first): its FPR may exceed the target",
    "below": "last ROC point with FPR strictly below the target (Wen et al.)",
}
DEFAULT_TARGETS = (0.01, 0.03)
LABEL_COLUMN = "label"

_POSITIVE = {"1", "1.0", "true", "yes", "y", "memorized", "memorised", "mem", "positive", "pos"}
_NEGATIVE = {
    "0", "0.0", "false", "no", "n", "not_memorized", "not memorized", "not-memorized", "not_memorised",
    "non_memorized", "nonmemorized", "unmemorized", "nmem", "clean", "negative", "neg",
}


# --------------------------------------------------------------------------------------- labels


def parse_labels(values: Sequence[Any] | pd.Series) -> np.ndarray:
    """Labels as float (1 memorized, 0 not, NaN unlabelled) from 0/1, booleans or names."""
    out = np.full(len(values), np.nan)
    unknown: list[str] = []
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
            continue
        text = str(value).strip().lower()
        if text in _POSITIVE:
            out[i] = 1.0
        elif text in _NEGATIVE:
            out[i] = 0.0
        elif text:
            unknown.append(str(value))
    if unknown:
        shown = ", ".join(repr(v) for v in sorted(set(unknown))[:3])
        raise InputError(
            f"unknown label values {shown}: use 1/0, true/false or memorized/not_memorized (empty = unlabelled)"
        )
    return out


def read_labels(path: Path, *, label_column: str = LABEL_COLUMN, id_column: str | None = None,
                prompt_column: str | None = None) -> pd.DataFrame:
    """A labels file as `prompt_id`, `prompt`, `label` (float: 1, 0 or NaN); any prompt format."""
    from memscan.io.readers import PromptSource

    source = PromptSource(path, prompt_column=prompt_column, id_column=id_column, keep_columns=[label_column])
    frame = source.read()
    return pd.DataFrame({
        "prompt_id": frame["prompt_id"].astype(str), "prompt": frame["prompt"],
        "label": parse_labels(frame[label_column]),
    })


def attach_labels(scores: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """`scores` with a float `label` column, joined on `prompt_id` or else on the prompt text.

    The key that labels more rows wins; a prompt text listed with two different labels is an error."""
    by_id = scores["prompt_id"].astype(str).map(labels.drop_duplicates("prompt_id").set_index("prompt_id")["label"])
    by_prompt = pd.Series(np.nan, index=scores.index)
    if "prompt" in scores and labels["prompt"].notna().any():
        known = labels.dropna(subset=["prompt", "label"])
        conflicts = known.groupby("prompt")["label"].nunique()
        if (conflicts > 1).any():
            raise InputError(f"labels: prompt {conflicts[conflicts > 1].index[0]!r} has conflicting labels")
        by_prompt = scores["prompt"].map(known.drop_duplicates("prompt").set_index("prompt")["label"])
    label = by_id if by_id.notna().sum() >= by_prompt.notna().sum() else by_prompt
    if label.notna().sum() == 0:
        raise InputError("no scored row matches a labelled row (by prompt_id or by prompt text)")
    return scores.assign(label=label.astype(float).to_numpy())


def load_labelled(
    scores_path: Path, labels_path: Path | None = None, *, label_column: str = LABEL_COLUMN,
    id_column: str | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A scores file with a `label` column (its own, or joined from a labels file) and its run facts."""
    from memscan.io.scores import read_scores

    scores, facts = read_scores(Path(scores_path))
    if labels_path is not None:
        labels = read_labels(Path(labels_path), label_column=label_column, id_column=id_column)
        return attach_labels(scores, labels), facts
    if label_column not in scores:
        raise InputError(f"{scores_path}: no {label_column!r} column; pass --labels FILE")
    return scores.assign(label=parse_labels(scores[label_column])), facts


def usable(frame: pd.DataFrame, column: str = "score") -> pd.DataFrame:
    """Rows that count for evaluation: scored (`status` ok), finite `column`, labelled."""
    keep = np.isfinite(frame[column].to_numpy(dtype=float)) & frame["label"].notna().to_numpy()
    if "status" in frame:
        keep &= (frame["status"] == STATUS_OK).to_numpy()
    return frame[keep]


# --------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class OperatingPoint:
    """One ROC point chosen for a target FPR; flag rule `score > threshold` reproduces it."""

    target_fpr: float
    convention: str
    tpr: float
    fpr: float
    threshold: float


@dataclass(frozen=True)
class Evaluation:
    """AUC, operating points and the ROC curve of one score column on labelled prompts."""

    name: str
    auc: float
    n_memorized: int
    n_not_memorized: int
    n_excluded: int
    points: tuple[OperatingPoint, ...]
    roc_fpr: np.ndarray = field(repr=False)
    roc_tpr: np.ndarray = field(repr=False)

    def point(self, target_fpr: float, convention: str) -> OperatingPoint:
        for p in self.points:
            if p.convention == convention and math.isclose(p.target_fpr, target_fpr):
                return p
        raise KeyError((target_fpr, convention))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: counts, AUC, and `tpr_at_fpr[target][convention] = {tpr, fpr, threshold}`."""
        table: dict[str, dict[str, dict[str, float]]] = {}
        for p in self.points:
            table.setdefault(f"{p.target_fpr:g}", {})[p.convention] = {
                "tpr": p.tpr, "fpr": p.fpr, "threshold": p.threshold,
            }
        return {
            "name": self.name, "auc": self.auc, "n_memorized": self.n_memorized,
            "n_not_memorized": self.n_not_memorized, "n_excluded": self.n_excluded, "tpr_at_fpr": table,
        }


def _check_binary(labels: np.ndarray) -> tuple[int, int]:
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    if positives == 0 or negatives == 0:
        raise InputError(
            f"evaluation needs both memorized and not-memorized prompts; got {positives} memorized "
            f"and {negatives} not memorized"
        )
    return positives, negatives


def _check_target(target_fpr: float) -> None:
    if not 0 < target_fpr < 1:
        raise UsageError(f"target FPR must be in (0, 1), got {target_fpr}")


def flag_threshold(roc_threshold: float, scores: np.ndarray) -> float:
    """The t with {score > t} == {score >= roc_threshold} on `scores`: halfway to the next lower score."""
    if not np.isfinite(roc_threshold):
        return float(np.max(scores))
    lower = scores[scores < roc_threshold]
    if lower.size == 0:
        return float(np.nextafter(roc_threshold, -np.inf))
    below = float(lower.max())
    middle = below + (roc_threshold - below) / 2
    return middle if middle < roc_threshold else below


def operating_point(
    fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, scores: np.ndarray,
    target_fpr: float, convention: str,
) -> OperatingPoint:
    """The ROC point for `target_fpr` under `convention` ('closest' or 'below')."""
    _check_target(target_fpr)
    if convention == "closest":
        gap = np.abs(fpr - target_fpr)
        tied = np.flatnonzero(gap == gap.min())
        index = int(tied[np.argmax(tpr[tied])])  # the reference's argmin is tied[0]; they differ only on ties
    elif convention == "below":
        index = int(np.flatnonzero(fpr < target_fpr)[-1])  # fpr[0] == 0, so one always exists
    else:
        raise UsageError(f"unknown TPR@FPR convention {convention!r}; use {' or '.join(CONVENTIONS)}")
    return OperatingPoint(
        target_fpr=float(target_fpr), convention=convention, tpr=float(tpr[index]), fpr=float(fpr[index]),
        threshold=flag_threshold(float(thresholds[index]), scores),
    )


def evaluate(
    labels: np.ndarray | Sequence[float], scores: np.ndarray | Sequence[float], *,
    targets: Sequence[float] = DEFAULT_TARGETS, name: str = "score",
) -> Evaluation:
    """AUC and TPR at each target FPR (both conventions); NaN labels or scores are excluded."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels, scores = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    keep = np.isfinite(labels) & np.isfinite(scores)
    labels, scores = labels[keep], scores[keep]
    positives, negatives = _check_binary(labels)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    points = tuple(
        operating_point(fpr, tpr, thresholds, scores, target, convention)
        for target in targets for convention in CONVENTIONS
    )
    return Evaluation(
        name=name, auc=float(roc_auc_score(labels, scores)), n_memorized=positives, n_not_memorized=negatives,
        n_excluded=int((~keep).sum()), points=points, roc_fpr=fpr, roc_tpr=tpr,
    )


def evaluate_frame(
    frame: pd.DataFrame, columns: Sequence[str] = ("score",), *, targets: Sequence[float] = DEFAULT_TARGETS,
    name: str | None = None,
) -> list[Evaluation]:
    """One Evaluation per score column of a labelled scores frame (unscored rows excluded)."""
    results = []
    for column in columns:
        if column not in frame:
            raise InputError(f"scores have no column {column!r}; available: {', '.join(map(str, frame.columns))}")
        rows = usable(frame, column)
        result = evaluate(rows["label"], rows[column], targets=targets, name=name or column)
        excluded = len(frame) - len(rows)
        results.append(replace(result, n_excluded=excluded))
    return results


# --------------------------------------------------------------------------------------- calibration


def min_clean_prompts(target_fpr: float, confidence: float) -> int:
    """Fewest clean prompts for which the guarantee can hold at all: (1 - α)^n <= 1 - confidence."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - target_fpr))


# The step from the chosen clean score to the threshold, relative to the largest |score|: far above
# float32 rounding (6e-8) and the thread-count noise of a UNet pass (the demo's scores move by up
# to 1e-5 of the largest between 1 and 2 torch threads), far below real gaps between scores.
THRESHOLD_STEP = 1e-3


def _short_decimal(low: float, high: float) -> float:
    """The value in [low, high] with the fewest significant digits (near the middle): a readable profile."""
    middle = (low + high) / 2
    for digits in range(1, 18):
        value = float(f"{middle:.{digits}g}")
        if low <= value <= high:
            return value
    return middle


def gap_threshold(chosen: float, scores: np.ndarray) -> float:
    """A threshold in the gap above `chosen` that no rounding-level change of any score moves a flag across.

    step = min(THRESHOLD_STEP * max|score|, half the gap to the next higher score); the threshold is
    the shortest decimal in [chosen + step / 2, chosen + step]: the same scores lie above it as above
    `chosen`, and each one's distance to it is at least a quarter of its gap or half a step."""
    scores = np.asarray(scores, dtype=np.float64)
    scale = float(np.abs(scores).max()) if scores.size else 0.0
    step = THRESHOLD_STEP * (scale or 1.0)
    higher = scores[scores > chosen]
    if higher.size:
        step = min(step, (float(higher.min()) - chosen) / 2)
    threshold = _short_decimal(chosen + step / 2, chosen + step)
    if not np.float32(threshold) > np.float32(chosen):  # a gap of one float32 ulp: the next float32 up
        threshold = float(np.nextafter(np.float32(chosen), np.float32(np.inf)))
    return threshold


def clean_threshold(
    clean_scores: np.ndarray, target_fpr: float, confidence: float = 0.9, *, others: np.ndarray | None = None,
) -> tuple[float, bool]:
    """(threshold, guaranteed): just above the clean score with m others above it, m the largest count
    with P(Binomial(n, α) <= m) <= 1 - confidence; with too few prompts for any m, just above the
    largest clean score and `guaranteed` False. "Just above" is `gap_threshold` over the clean scores
    and `others` (the memorized prompts' scores), so float rounding (thread counts, machines) cannot
    flip a calibration prompt; any threshold above the order statistic keeps the guarantee."""
    from scipy.stats import binom

    _check_target(target_fpr)
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must be in (0, 1), got {confidence}")
    ordered = np.sort(np.asarray(clean_scores, dtype=np.float64))
    n = ordered.size
    if n == 0:
        raise InputError("calibration needs known-clean (not memorized) prompts; got none")
    allowed = np.flatnonzero(binom.cdf(np.arange(n), n, target_fpr) <= 1 - confidence)
    above = int(allowed[-1]) if allowed.size else 0
    labelled = ordered if others is None else np.r_[ordered, np.asarray(others, dtype=np.float64)]
    return gap_threshold(float(ordered[n - 1 - above]), labelled), bool(allowed.size)


def fit_weights(norm: np.ndarray, alignment: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(w_norm, w_align) by class-balanced logistic regression, scaled so |w_norm| = 1.

    Features are standardised for the fit and the coefficients mapped back to raw units, so the
    weights apply to the raw terms as `anisotropy` combines them. Only their ratio matters."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels, dtype=float)
    _check_binary(labels)
    features = np.column_stack([norm, alignment]).astype(np.float64)
    scale = features.std(axis=0)
    scale[scale == 0] = 1.0
    model = LogisticRegression(class_weight="balanced", max_iter=1000)
    model.fit((features - features.mean(axis=0)) / scale, labels.astype(int))
    w_norm, w_align = (model.coef_[0] / scale).tolist()
    unit = abs(w_norm) or abs(w_align) or 1.0
    return w_norm / unit, w_align / unit


def combined(norm: np.ndarray, alignment: np.ndarray, w_norm: float, w_align: float) -> np.ndarray:
    """w_norm * norm + w_align * alignment in float32, the same arithmetic as the method."""
    return w_norm * np.asarray(norm, dtype=np.float32) + w_align * np.asarray(alignment, dtype=np.float32)


@dataclass(frozen=True)
class Calibration:
    """Weights (None: the score column as it is; `fitted` or the scores' own) and the threshold,
    with the FPR/TPR it gives on the calibration prompts (and on held-out ones)."""

    threshold: float
    target_fpr: float
    confidence: float
    guaranteed: bool
    w_norm: float | None
    w_align: float | None
    fitted: bool
    n_memorized: int
    n_clean: int
    fpr: float
    tpr: float | None
    holdout: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    flagged = scores > np.float32(threshold)
    clean, memorized = labels == 0, labels == 1
    return {
        "n_memorized": int(memorized.sum()), "n_clean": int(clean.sum()),
        "fpr": float(flagged[clean].mean()) if clean.any() else None,
        "tpr": float(flagged[memorized].mean()) if memorized.any() else None,
    }


def calibrate(
    frame: pd.DataFrame, *, target_fpr: float = 0.01, confidence: float = 0.9, fit: bool = True,
    weights: tuple[float, float] | None = None, holdout: float = 0.0, seed: int = 0,
) -> Calibration:
    """Weights (from (norm, alignment) when `fit`, else `weights`, else the scores as they are) and
    the clean-prompt threshold at `target_fpr`; `holdout` keeps a stratified share aside to measure."""
    rows = usable(frame, "score")
    has_terms = {"norm", "alignment"} <= set(rows.columns)
    if fit and not has_terms:
        raise InputError("fitting weights needs `norm` and `alignment` columns (anisotropy scores); use --no-fit")
    test = rows.iloc[0:0]
    if holdout:
        if not 0 < holdout < 1:
            raise UsageError(f"--holdout must be in (0, 1), got {holdout}")
        from sklearn.model_selection import train_test_split

        try:
            rows, test = train_test_split(rows, test_size=holdout, random_state=seed, stratify=rows["label"])
        except ValueError as exc:
            raise InputError(f"cannot hold out {holdout:g} of the labelled prompts: {exc}") from None
    labels = rows["label"].to_numpy()
    if fit:
        weights = fit_weights(rows["norm"].to_numpy(), rows["alignment"].to_numpy(), labels)

    def score(part: pd.DataFrame) -> np.ndarray:
        if weights is None or not has_terms:
            return part["score"].to_numpy(dtype=np.float32)
        return combined(part["norm"], part["alignment"], *weights)

    scores = score(rows)
    threshold, guaranteed = clean_threshold(scores[labels == 0], target_fpr, confidence, others=scores[labels == 1])
    measured = _rates(scores, labels, threshold)
    held = _rates(score(test), test["label"].to_numpy(), threshold) if len(test) else None
    w_norm, w_align = weights if weights is not None and has_terms else (None, None)
    return Calibration(
        threshold=threshold, target_fpr=target_fpr, confidence=confidence, guaranteed=guaranteed, w_norm=w_norm,
        w_align=w_align, fitted=fit,
        n_memorized=measured["n_memorized"], n_clean=measured["n_clean"], fpr=measured["fpr"],
        tpr=measured["tpr"], holdout=held,
    )


# --------------------------------------------------------------------------------------- profiles

_SCORING_KEYS = (
    "num_inference_steps", "t_hi_index", "t_lo_index", "w_norm", "w_align", "threshold", "v_convention", "norm_scale",
)


def base_profile(facts: dict[str, Any], model: str | None = None) -> ModelProfile:
    """The profile a calibration starts from: `model` if given, else the one the scores were made with."""
    from memscan.models.loading import resolve_profile
    from memscan.models.profiles import available_profiles, default_profile_for

    if model is not None:
        return resolve_profile(model)
    name = facts.get("model")
    if name in available_profiles():
        return resolve_profile(name)
    if not facts.get("source"):
        raise UsageError("the scores carry no model facts; name the model with --model")
    profile = default_profile_for(facts["source"], facts.get("prediction_type", "epsilon"))
    known = {k: facts[k] for k in ("resolution", *_SCORING_KEYS) if facts.get(k) is not None}
    return profile.with_overrides(**known)


def calibrated_profile(
    base: ModelProfile, result: Calibration, name: str, facts: dict[str, Any], *, origin: str = "",
) -> ModelProfile:
    """`base` with the fitted weights and threshold, and a `calibration` table saying how they were made."""
    measured = {k: v for k, v in result.to_dict().items() if k not in ("holdout", "w_norm", "w_align", "threshold")}
    record: dict[str, Any] = {
        "method": facts.get("method", "anisotropy"), "n_noise": facts.get("n_noise"), "seed": facts.get("seed"),
        "dtype": facts.get("dtype"), **measured,
    }
    for key, value in (result.holdout or {}).items():
        record[f"holdout_{key}"] = value
    note = f"calibrated by memscan calibrate{f' on {origin}' if origin else ''}"
    description = f"{base.description} ({note})" if base.description else note
    changes: dict[str, Any] = {"name": name, "threshold": result.threshold, "description": description}
    if result.w_norm is not None:
        changes.update(w_norm=result.w_norm, w_align=result.w_align)
    for key in ("v_convention", "norm_scale", "num_inference_steps", "t_hi_index", "t_lo_index"):
        if facts.get(key) is not None:
            changes[key] = facts[key]
    return replace(base, **changes, calibration={k: v for k, v in record.items() if v is not None})


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def profile_to_toml(profile: ModelProfile, **paths: str) -> str:
    """A profile as TOML that `load_profile_file` reads back (None fields are left out); `paths`
    replace fields as written (`source`, `text_similarity`: see `local_reference`)."""
    data = {k: v for k, v in profile.to_dict().items() if v is not None and k != "name"}
    data.update(paths)
    tables = {"scoring": {k: data.pop(k) for k in _SCORING_KEYS if k in data}}
    if data.get("text_similarity", "pooled") != "pooled":
        tables["mitigation"] = {"text_similarity": data.pop("text_similarity")}
    data.pop("text_similarity", None)
    tables.update({k: data.pop(k) for k in list(data) if isinstance(data[k], dict)})
    lines = ["# memscan model profile (read by `memscan detect --model FILE.toml`)"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in data.items()]
    for table, values in tables.items():
        if values:
            lines += ["", f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def local_reference(value: str, path: Path) -> str:
    """A model source (or judge) as written at `path`: relative (./, ../) inside the shipped config
    folder, so the repository stays relocatable; absolute for other local paths; hub ids and
    names as they are."""
    from memscan.paths import config_dir

    local = Path(value).expanduser()
    if not local.exists():
        return value
    folder = path.resolve().parent
    if folder == config_dir().resolve():
        relative = os.path.relpath(local.resolve(), folder)
        return relative if relative.startswith("..") else f"./{relative}"
    return str(local.resolve())


def write_profile(profile: ModelProfile, path: Path) -> Path:
    """Write `profile` to `path` as TOML, atomically."""
    from memscan.io.scores import atomic_write_bytes
    from memscan.models.profiles import TEXT_SIMILARITIES

    judge = profile.text_similarity
    text = profile_to_toml(profile, source=local_reference(profile.source, path),
                           text_similarity=judge if judge in TEXT_SIMILARITIES else local_reference(judge, path))
    atomic_write_bytes(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return Path(path)


def calibrate_scores(
    scores_path: Path, output: Path, *, labels_path: Path | None = None, model: str | None = None,
    target_fpr: float = 0.01, confidence: float = 0.9, fit: bool = True, holdout: float = 0.0, seed: int = 0,
    label_column: str = LABEL_COLUMN, if_exists: str = "fail",
) -> tuple[ModelProfile, Calibration]:
    """`memscan calibrate`: fit on a labelled scores file and write the calibrated profile (never over
    an input; over an existing file only with `if_exists="overwrite"`)."""
    from memscan.outputs import check_output

    check_output(output, inputs=[p for p in (scores_path, labels_path) if p is not None], if_exists=if_exists,
                 what="profile")
    frame, facts = load_labelled(scores_path, labels_path, label_column=label_column)
    weights = None
    if not fit and facts.get("w_norm") is not None and facts.get("method") == "anisotropy":
        weights = (float(facts["w_norm"]), float(facts["w_align"]))
    fit = fit and facts.get("method", "anisotropy") == "anisotropy"
    result = calibrate(
        frame, target_fpr=target_fpr, confidence=confidence, fit=fit, weights=weights, holdout=holdout, seed=seed
    )
    profile = calibrated_profile(base_profile(facts, model), result, Path(output).stem, facts,
                                 origin=Path(scores_path).name)
    write_profile(profile, Path(output))
    return profile, result


def evaluate_files(
    paths: Sequence[Path], labels_path: Path | None = None, *, columns: Sequence[str] = ("score",),
    targets: Sequence[float] = DEFAULT_TARGETS, label_column: str = LABEL_COLUMN,
) -> list[dict[str, Any]]:
    """`memscan evaluate`: one result dict per (scores file, column), named by method (file on clashes).

    A column missing from some files is skipped there; missing from all, it is an error."""
    loaded = [(Path(p), *load_labelled(Path(p), labels_path, label_column=label_column)) for p in paths]
    for column in columns:
        if not any(column in frame for _, frame, _ in loaded):
            raise InputError(f"no scores file has a column {column!r}")
    methods = [str(facts.get("method") or path.stem) for path, _, facts in loaded]
    rows = []
    for (path, frame, _), method in zip(loaded, methods, strict=True):
        name = method if methods.count(method) == 1 else f"{method} ({path.stem})"
        present = [c for c in columns if c in frame]
        for result in evaluate_frame(frame, present, targets=targets):
            label = name if result.name == "score" else f"{name}:{result.name}"
            rows.append({**result.to_dict(), "name": label, "scores": str(path)})
    return rows
