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

Caption families: prompts that come in families (one template, one subject in many phrasings) are
not exchangeable, and the binomial count over prompts overstates the guarantee (one family above the
rest is m "independent" false positives). With groups (a column, or `caption_groups`), the count is
over groups: a clean group is a false positive when any of its clean prompts is above the threshold,
n is the number of clean groups, and the threshold is just above the group-maximum clean score with m
groups above it. Then, with probability at least `confidence`, at most α of new clean caption
families (drawn like these) have a member above the threshold. `--holdout` keeps whole groups on one
side, and both prompt- and group-level FPR are reported.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from memscan.errors import InputError, UsageError
from memscan.io.scores import STATUS_OK
from memscan.models.profiles import ModelProfile
from memscan.storage import location
from memscan.timestep_search import ALIGN_PREFIX, NORM_PREFIX, choose_pair, searched_indices

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
                prompt_column: str | None = None, extra_columns: Sequence[str] = ()) -> pd.DataFrame:
    """A labels file as `prompt_id`, `prompt`, `label` (float: 1, 0 or NaN), plus `extra_columns` as
    they are (a group column); any prompt format."""
    from memscan.io.readers import PromptSource

    keep = [label_column, *(c for c in extra_columns if c != label_column)]
    source = PromptSource(path, prompt_column=prompt_column, id_column=id_column, keep_columns=keep)
    frame = source.read()
    return pd.DataFrame({
        "prompt_id": frame["prompt_id"].astype(str), "prompt": frame["prompt"],
        "label": parse_labels(frame[label_column]), **{c: frame[c] for c in extra_columns},
    })


def attach_labels(scores: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """`scores` with a float `label` column, joined on `prompt_id` or else on the prompt text; the
    labels' other columns (but `prompt_id`, `prompt`) come along on the same key.

    The key that labels more rows wins; a prompt text listed with two different labels is an error."""
    by_id_table = labels.drop_duplicates("prompt_id").set_index("prompt_id")
    by_id = scores["prompt_id"].astype(str).map(by_id_table["label"])
    by_prompt = pd.Series(np.nan, index=scores.index)
    if "prompt" in scores and labels["prompt"].notna().any():
        known = labels.dropna(subset=["prompt", "label"])
        conflicts = known.groupby("prompt")["label"].nunique()
        if (conflicts > 1).any():
            raise InputError(f"labels: prompt {conflicts[conflicts > 1].index[0]!r} has conflicting labels")
        by_prompt_table = known.drop_duplicates("prompt").set_index("prompt")
        by_prompt = scores["prompt"].map(by_prompt_table["label"])
    use_id = by_id.notna().sum() >= by_prompt.notna().sum()
    label = by_id if use_id else by_prompt
    if label.notna().sum() == 0:
        raise InputError("no scored row matches a labelled row (by prompt_id or by prompt text)")
    extra = {}
    for column in (c for c in labels.columns if c not in ("prompt_id", "prompt", "label")):
        key, table = (scores["prompt_id"].astype(str), by_id_table) if use_id else (scores["prompt"], by_prompt_table)
        extra[column] = key.map(table[column]).to_numpy()
    return scores.assign(label=label.astype(float).to_numpy(), **extra)


def load_labelled(
    scores_path: Path, labels_path: Path | None = None, *, label_column: str = LABEL_COLUMN,
    id_column: str | None = None, extra_columns: Sequence[str] = (),
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A scores file with a `label` column (its own, or joined from a labels file) and its run facts;
    `extra_columns` (a group column) come from the labels file when it has them, else from the scores."""
    from memscan.io.scores import read_scores

    scores, facts = read_scores(location(scores_path))
    if labels_path is not None:
        columns = _columns_of(labels_path) if extra_columns else set()
        from_labels = [c for c in extra_columns if c in columns]
        labels = read_labels(labels_path, label_column=label_column, id_column=id_column,
                             extra_columns=from_labels)
        frame = attach_labels(scores.drop(columns=[c for c in from_labels if c in scores]), labels)
    elif label_column not in scores:
        raise InputError(f"{scores_path}: no {label_column!r} column; pass --labels FILE")
    else:
        frame = scores.assign(label=parse_labels(scores[label_column]))
    missing = [c for c in extra_columns if c not in frame]
    if missing:
        raise InputError(f"no column {missing[0]!r} in {labels_path or scores_path}"
                         + (f" or {scores_path}" if labels_path is not None else ""))
    return frame, facts


def _columns_of(path: Path) -> set[str]:
    """The column names of a prompt file (none for plain text)."""
    from memscan.io.readers import PromptSource

    try:
        return set(PromptSource(path).columns)
    except InputError:
        return set()


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


def allowed_above(n: int, target_fpr: float, confidence: float) -> int | None:
    """The most of n clean draws the threshold may leave above it: the largest m with
    P(Binomial(n, α) <= m) <= 1 - confidence; None when even m = 0 does not qualify (too few)."""
    from scipy.stats import binom

    allowed = np.flatnonzero(binom.cdf(np.arange(n), n, target_fpr) <= 1 - confidence)
    return int(allowed[-1]) if allowed.size else None


def clean_threshold(
    clean_scores: np.ndarray, target_fpr: float, confidence: float = 0.9, *, others: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> tuple[float, bool]:
    """(threshold, guaranteed): just above the clean score with m others above it, m the largest count
    with P(Binomial(n, α) <= m) <= 1 - confidence; with too few prompts for any m, just above the
    largest clean score and `guaranteed` False. "Just above" is `gap_threshold` over the clean scores
    and `others` (the memorized prompts' scores), so float rounding (thread counts, machines) cannot
    flip a calibration prompt; any threshold above the order statistic keeps the guarantee.

    With `groups` (one per clean score) the count is over groups: each group's largest clean score is
    one draw, n the number of groups, so exactly m groups have a member above the threshold."""
    _check_target(target_fpr)
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must be in (0, 1), got {confidence}")
    clean = np.asarray(clean_scores, dtype=np.float64)
    draws = clean if groups is None else pd.Series(clean).groupby(np.asarray(groups)).max().to_numpy()
    ordered = np.sort(draws)
    n = ordered.size
    if n == 0:
        raise InputError("calibration needs known-clean (not memorized) prompts; got none")
    allowed = allowed_above(n, target_fpr, confidence)
    above = allowed or 0
    labelled = np.sort(clean) if others is None else np.r_[clean, np.asarray(others, dtype=np.float64)]
    return gap_threshold(float(ordered[n - 1 - above]), labelled), allowed is not None


# Caption families found from the text (`--groups auto`): two prompts are in one family when their
# word sets have Jaccard similarity >= GROUP_JACCARD, or when they are the same caption once digits
# and punctuation are removed ("photo 12 of x." and "photo 7 of x"); families are the connected
# components (single linkage) of that relation. Words: lower case, split on anything that is not a
# letter. At 0.7, captions of 6 or more words that differ in one word are one family
# ("a red boat on the rocks at night", "a blue boat on the rocks at night"); two 4-word captions that
# differ in one word are not (3/5).
GROUP_JACCARD = 0.7
_NOT_A_LETTER = re.compile(r"[\W\d_]+")


def caption_words(text: Any) -> tuple[str, ...]:
    """A caption's words: lower case, digits and punctuation removed."""
    return tuple(_NOT_A_LETTER.sub(" ", "" if text is None or text is pd.NA else str(text).lower()).split())


def caption_groups(prompts: Sequence[Any], *, jaccard: float = GROUP_JACCARD) -> np.ndarray:
    """Caption families (see GROUP_JACCARD): an int per prompt, numbered 0, 1, ... by first appearance.

    Deterministic and exact. Prompts with the same word set are one family at once (Jaccard 1);
    between distinct word sets, candidate pairs come from prefix filtering (two sets with Jaccard >= t
    share one of the first |A| - ceil(t|A|) + 1 words of each, rarest first), so common words like
    "a" or "the" cost nothing, and the candidates' overlaps are counted with numpy."""
    if not 0 < jaccard <= 1:
        raise UsageError(f"group Jaccard similarity must be in (0, 1], got {jaccard}")
    distinct: dict[frozenset[str], int] = {}
    of_prompt = np.array([distinct.setdefault(frozenset(caption_words(p)), len(distinct)) for p in prompts],
                         dtype=np.int64)
    sets = list(distinct)
    frequency: dict[str, int] = {}
    for word_set in sets:
        for word in word_set:
            frequency[word] = frequency.get(word, 0) + 1
    rank = {w: r for r, w in enumerate(sorted(frequency, key=lambda w: (frequency[w], w)))}  # rarest first
    ordered = [np.sort(np.fromiter((rank[w] for w in word_set), dtype=np.int64, count=len(word_set)))
               for word_set in sets]
    sizes = np.array([len(x) for x in ordered], dtype=np.int64)
    indptr = np.r_[0, np.cumsum(sizes)]
    indices = np.concatenate(ordered) if ordered else np.zeros(0, dtype=np.int64)
    prefixes = [x[: len(x) - math.ceil(jaccard * len(x) - 1e-9) + 1] if len(x) else x for x in ordered]
    owners = np.repeat(np.arange(len(sets)), [len(x) for x in prefixes])
    flat = np.concatenate(prefixes) if prefixes else np.zeros(0, dtype=np.int64)
    order = np.lexsort((owners, flat))  # postings: for each word, the sets with it in their prefix, ascending
    posting_words, posting_sets = flat[order], owners[order]
    bounds = np.searchsorted(posting_words, np.arange(len(rank) + 1))
    parent = np.arange(len(sets))
    member = np.zeros(len(rank), dtype=bool)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for i, prefix in enumerate(prefixes):
        parts = []
        for word in prefix:
            posting = posting_sets[bounds[word]:bounds[word + 1]]
            parts.append(posting[: np.searchsorted(posting, i)])  # the sets before this one
        candidates = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        size = sizes[candidates]  # Jaccard >= t needs t|A| <= |B| <= |A|/t
        candidates = candidates[(size >= jaccard * sizes[i] - 1e-9) & (size * jaccard <= sizes[i] + 1e-9)]
        if not candidates.size:
            continue
        lengths = sizes[candidates]
        ends = np.cumsum(lengths)
        positions = np.repeat(indptr[candidates] - ends + lengths, lengths) + np.arange(ends[-1])
        member[ordered[i]] = True
        shared = np.add.reduceat(member[indices[positions]], ends - lengths).astype(np.float64)
        member[ordered[i]] = False
        similar = shared >= jaccard * (lengths + sizes[i] - shared) - 1e-6
        for j in candidates[similar]:
            a, b = root(i), root(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = [root(int(i)) for i in of_prompt]
    numbering: dict[int, int] = {}
    return np.array([numbering.setdefault(r, len(numbering)) for r in roots], dtype=np.int64)


def _group_ids(groups: Sequence[Any] | pd.Series) -> np.ndarray:
    """Group values as ints; a missing value (None, NaN, empty) is a group of its own."""
    values = pd.Series(list(groups), dtype=object)
    missing = values.isna() | (values.astype(str).str.strip() == "")
    codes = pd.factorize(values.where(~missing, None), use_na_sentinel=True)[0].astype(np.int64)
    codes[missing.to_numpy()] = codes.max(initial=-1) + 1 + np.arange(int(missing.sum()))
    return codes


def group_split(labels: np.ndarray, groups: np.ndarray, holdout: float, seed: int = 0) -> np.ndarray:
    """A boolean mask of the held-out rows: whole groups, `holdout` of the rows of each label as far
    as groups allow. Groups are sorted into strata by their majority label (ties: memorized); within
    each, a seeded shuffle of the groups is walked, and a group is held out when that brings the
    held-out rows of the stratum closer to `holdout` of them (at least one group of each stratum
    stays for the fit)."""
    labels, groups = np.asarray(labels, dtype=float), np.asarray(groups)
    frame = pd.DataFrame({"group": groups, "label": labels})
    per_group = frame.groupby("group", sort=True)["label"].agg(["size", "mean"])
    stratum = (per_group["mean"] >= 0.5).astype(int)
    rng = np.random.default_rng(seed)
    held: set[Any] = set()
    for value in (0, 1):
        members = per_group.index[stratum == value].to_numpy()
        members = members[rng.permutation(len(members))]
        sizes = per_group.loc[members, "size"].to_numpy()
        target, taken, kept = holdout * sizes.sum(), 0, len(members)
        for group, size in zip(members, sizes, strict=True):
            if kept > 1 and abs(taken + size - target) < abs(taken - target):
                held.add(group)
                taken += size
                kept -= 1
    return frame["group"].isin(held).to_numpy()


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
    groups: str | None = None  # what the guarantee counts over: None (prompts), "auto" or the group column
    n_clean_groups: int | None = None
    group_fpr: float | None = None  # share of clean groups with a member above the threshold
    warnings: tuple[str, ...] = ()
    t_hi_index: int | None = None  # the step pair chosen by a timestep search (None: no search)
    t_lo_index: int | None = None
    timestep_search: dict[str, Any] | None = None  # how the chosen and the profile's pair did

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if v is not None and v != ()}


def _rates(scores: np.ndarray, labels: np.ndarray, threshold: float, groups: np.ndarray | None = None,
           target_fpr: float | None = None) -> dict[str, Any]:
    """Prompt-level FPR and TPR at `threshold`; with groups also the share of clean groups with a
    member above it (`group_fpr`) and their number; with `target_fpr` the AUC and the ROC's TPR at
    that FPR ('below' convention) too."""
    flagged = scores > np.float32(threshold)
    clean, memorized = labels == 0, labels == 1
    rates = {
        "n_memorized": int(memorized.sum()), "n_clean": int(clean.sum()),
        "fpr": float(flagged[clean].mean()) if clean.any() else None,
        "tpr": float(flagged[memorized].mean()) if memorized.any() else None,
    }
    if clean.any() and memorized.any() and target_fpr is not None:  # the ranking itself, whatever the threshold
        ranking = evaluate(labels, scores, targets=(target_fpr,))
        rates["auc"] = ranking.auc
        rates["roc_tpr_at_target_fpr"] = ranking.point(target_fpr, "below").tpr
    if groups is not None:
        per_group = pd.Series(flagged[clean]).groupby(np.asarray(groups)[clean]).any()
        rates["n_clean_groups"] = int(per_group.size)
        rates["group_fpr"] = float(per_group.mean()) if per_group.size else None
    return rates


# A warning when flagged clean prompts cluster in one caption family: on a side (fit or holdout) with
# at least CLUSTER_MIN clean prompts above the threshold, more than half of them come from one group
# whose share of those false positives is at least CLUSTER_RATIO times its share of the clean prompts.
CLUSTER_MIN = 3
CLUSTER_RATIO = 5.0
# Without groups, caption families are looked for (to warn) only in calibrations of at most this many
# rows: finding them costs up to seconds per 10,000 captions of a small vocabulary, growing as n^2.
DIAGNOSE_MAX = 20_000


def false_positive_cluster(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, threshold: float,
    prompts: Sequence[Any] | None = None,
) -> str | None:
    """A sentence when the clean prompts above `threshold` cluster in one group (see CLUSTER_MIN), else None."""
    clean = labels == 0
    above = clean & (scores > np.float32(threshold))
    count = int(above.sum())
    if count < CLUSTER_MIN:
        return None
    groups = np.asarray(groups)
    counts = pd.Series(groups[above]).value_counts(sort=True)
    top, top_count = counts.index[0], int(counts.iloc[0])
    clean_share = float((groups[clean] == top).sum() / clean.sum())
    if top_count * 2 <= count or top_count / count < CLUSTER_RATIO * clean_share:
        return None
    example = ""
    if prompts is not None:
        first = np.flatnonzero(above & (groups == top))[0]
        example = f", e.g. {str(prompts[first])!r}"
    return (f"{top_count} of the {count} clean prompts above the threshold come from one caption family "
            f"({int((groups[clean] == top).sum())} clean prompts, {clean_share:.1%} of them{example})")


# A warning when one clean prompt (or family) sets the threshold and costs much of the TPR: removing
# it would raise the calibration side's TPR at the threshold by at least this much.
SETTER_TPR_GAIN = 0.2


def threshold_setter(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, threshold: float, target_fpr: float,
    confidence: float, prompts: Sequence[Any] | None = None,
) -> str | None:
    """A sentence when the clean score the threshold sits on is one prompt (or family, with `groups`)
    whose removal would raise the TPR by SETTER_TPR_GAIN or more, else None. On a few hundred clean
    prompts the guarantee puts the threshold above the largest clean score, so one mislabelled or
    odd caption decides how much is flagged; the user should look at it, or label more."""
    from scipy.stats import binom

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    clean, memorized = labels == 0, labels == 1
    if not memorized.any() or clean.sum() < 2:
        return None
    ids = np.arange(len(scores)) if groups is None else np.asarray(groups)
    below = clean & (scores <= np.float32(threshold))
    if not below.any():
        return None
    setter = int(np.flatnonzero(below)[np.argmax(scores[below])])
    rest = clean & (ids != ids[setter])
    if not rest.any():
        return None
    others = scores[memorized]
    tpr = float((others > np.float32(threshold)).mean())
    without, _ = clean_threshold(scores[rest], target_fpr, confidence, others=others,
                                 groups=None if groups is None else ids[rest])
    gain = float((others > np.float32(without)).mean()) - tpr
    if gain < SETTER_TPR_GAIN:
        return None
    draws = int(np.unique(ids[clean]).size)
    left_above = allowed_above(draws, target_fpr, confidence) or 0  # clean draws the threshold leaves above it now
    sizes = np.arange(draws, draws + 100_000)
    enough = sizes[binom.cdf(left_above + 1, sizes, target_fpr) <= 1 - confidence]
    unit = "prompts" if groups is None else "caption families"
    named = f"{str(prompts[setter])!r}, " if prompts is not None else ""
    more = f"; from {int(enough[0])} clean {unit} on, the guarantee leaves one more above it" if enough.size else ""
    return (f"one clean prompt sets the threshold ({named}score {scores[setter]:.4g}, above "
            f"{int((others < scores[setter]).sum())} of {int(memorized.sum())} memorized prompts): without it the "
            f"TPR would be {tpr + gain:.3f}, not {tpr:.3f}. Look at it and its label (a training caption whose "
            f"generations vary is labelled clean and may still score like a memorized one){more}")


def calibrate(
    frame: pd.DataFrame, *, target_fpr: float = 0.01, confidence: float = 0.9, fit: bool = True,
    weights: tuple[float, float] | None = None, holdout: float = 0.0, seed: int = 0,
    group_column: str | None = None, auto_groups: bool = False, default_pair: tuple[int, int] = (0, -3),
) -> Calibration:
    """Weights (from (norm, alignment) when `fit`, else `weights`, else the scores as they are) and
    the clean-prompt threshold at `target_fpr`; `holdout` keeps a stratified share aside to measure.

    With groups (`group_column` of `frame`, or `auto_groups`: caption families of the prompt text),
    the guarantee counts clean groups, not prompts, and the holdout keeps whole groups on one side
    (see clean_threshold, group_split). Without, the clean prompts above the threshold are still
    checked for one dominant caption family (a warning), when the prompt text is there.

    When `frame` has the per-step term columns of `memscan.timestep_search.term_columns`, the step
    pair is chosen on the calibration side (`default_pair`, the profile's, unless beaten) and its
    terms replace `norm` and `alignment` on both sides."""
    if group_column is not None and auto_groups:
        raise UsageError("give --group-column or --groups auto, not both")
    rows = usable(frame, "score")
    has_terms = {"norm", "alignment"} <= set(rows.columns)
    if fit and not has_terms:
        raise InputError("fitting weights needs `norm` and `alignment` columns (anisotropy scores); use --no-fit")
    texts = rows["prompt"].to_numpy(dtype=object) if "prompt" in rows else None
    has_text = texts is not None and pd.notna(texts).any()
    grouped = group_column is not None or auto_groups
    if auto_groups and not has_text:
        raise InputError("--groups auto needs the prompt text, and the scores have none (--no-store-prompt?); "
                         "pass --labels with the prompts, or --group-column")
    if group_column is not None:
        if group_column not in rows:
            raise InputError(f"no group column {group_column!r}; available: {', '.join(map(str, frame.columns))}")
        groups = _group_ids(rows[group_column])
    elif auto_groups:
        groups = caption_groups(texts)
    else:
        groups = np.arange(len(rows))  # each prompt its own group: the guarantee as it always was
    fit_index, test_index = np.arange(len(rows)), np.arange(0)
    if holdout:
        if not 0 < holdout < 1:
            raise UsageError(f"--holdout must be in (0, 1), got {holdout}")
        if grouped:
            held_out = group_split(rows["label"].to_numpy(), groups, holdout, seed)
            fit_index, test_index = np.flatnonzero(~held_out), np.flatnonzero(held_out)
        else:
            from sklearn.model_selection import train_test_split

            try:
                fit_index, test_index = train_test_split(fit_index, test_size=holdout, random_state=seed,
                                                         stratify=rows["label"])
            except ValueError as exc:
                raise InputError(f"cannot hold out {holdout:g} of the labelled prompts: {exc}") from None
    test, rows = rows.iloc[test_index], rows.iloc[fit_index]
    test_groups, groups = groups[test_index], groups[fit_index]
    test_texts, texts = (None, None) if texts is None else (texts[test_index], texts[fit_index])
    labels = rows["label"].to_numpy()
    if grouped and holdout and not ((labels == 0).any() and (labels == 1).any()):
        raise InputError(f"cannot hold out {holdout:g} of the labelled prompts by group: the fit side would lack "
                         "memorized or clean prompts (too few groups)")
    pair = None
    if searched_indices(rows):
        if not fit:
            raise UsageError("--search-timesteps fits the weights of the chosen steps; drop --no-fit")
        pair = choose_pair(rows, labels, default=default_pair, target_fpr=target_fpr)
        rows, test = (part.assign(norm=part[f"{NORM_PREFIX}{pair.t_hi_index}"],
                                  alignment=part[f"{ALIGN_PREFIX}{pair.t_lo_index}"]) for part in (rows, test))
    if fit:
        weights = fit_weights(rows["norm"].to_numpy(), rows["alignment"].to_numpy(), labels)

    def score(part: pd.DataFrame) -> np.ndarray:
        if weights is None or not has_terms:
            return part["score"].to_numpy(dtype=np.float32)
        return combined(part["norm"], part["alignment"], *weights)

    scores = score(rows)
    clean = labels == 0
    threshold, guaranteed = clean_threshold(scores[clean], target_fpr, confidence, others=scores[~clean],
                                            groups=groups[clean] if grouped else None)
    measured = _rates(scores, labels, threshold, groups if grouped else None)
    test_scores = score(test)
    held = _rates(test_scores, test["label"].to_numpy(), threshold, test_groups if grouped else None,
                  target_fpr) if len(test) else None
    sides = {"calibration": (scores, labels, groups, texts),
             "holdout": (test_scores, test["label"].to_numpy(), test_groups, test_texts)}
    if not grouped and has_text and len(frame) <= DIAGNOSE_MAX and any(
        ((side[1] == 0) & (side[0] > np.float32(threshold))).sum() >= CLUSTER_MIN for side in sides.values()
    ):  # enough clean prompts above the threshold to ask whether they are one caption family
        found = caption_groups(np.r_[texts, test_texts])
        sides["calibration"] = (scores, labels, found[: len(rows)], texts)
        sides["holdout"] = (*sides["holdout"][:2], found[len(rows):], test_texts)
    warnings = []
    for side, (side_scores, side_labels, side_groups, side_texts) in sides.items():
        cluster = false_positive_cluster(side_scores, side_labels, side_groups, threshold, side_texts)
        if cluster:
            advice = ("; the guarantee counts that family once" if grouped else
                      "; families are not exchangeable prompts: calibrate with --group-column or --groups auto")
            warnings.append(f"{side} side: {cluster}{advice}")
    setter = threshold_setter(scores, labels, groups if grouped else None, threshold, target_fpr, confidence, texts)
    if setter:
        warnings.append(f"calibration side: {setter}")
    w_norm, w_align = weights if weights is not None and has_terms else (None, None)
    return Calibration(
        threshold=threshold, target_fpr=target_fpr, confidence=confidence, guaranteed=guaranteed, w_norm=w_norm,
        w_align=w_align, fitted=fit,
        n_memorized=measured["n_memorized"], n_clean=measured["n_clean"], fpr=measured["fpr"],
        tpr=measured["tpr"], holdout=held,
        groups=("auto" if auto_groups else group_column) if grouped else None,
        n_clean_groups=measured.get("n_clean_groups"), group_fpr=measured.get("group_fpr"),
        warnings=tuple(warnings),
        **({} if pair is None else {
            "t_hi_index": pair.t_hi_index, "t_lo_index": pair.t_lo_index,
            "timestep_search": {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(pair).items()},
        }),
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
    measured = {k: v for k, v in result.to_dict().items()
                if k not in ("holdout", "w_norm", "w_align", "threshold", "warnings", "t_hi_index", "t_lo_index",
                             "timestep_search")}
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
    search = result.timestep_search
    if search is not None:  # the searched pair, written as the profile had it when it is the same step
        steps = changes.get("num_inference_steps", base.num_inference_steps)
        for key in ("t_hi_index", "t_lo_index"):
            if getattr(result, key) != changes.get(key, getattr(base, key)) % steps:
                changes[key] = getattr(result, key)
        record.update({f"search_{k}": v for k, v in search.items()})
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

    path = location(path)  # type: ignore[assignment]
    judge = profile.text_similarity
    text = profile_to_toml(profile, source=local_reference(profile.source, path),
                           text_similarity=judge if judge in TEXT_SIMILARITIES else local_reference(judge, path))
    atomic_write_bytes(location(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return location(path)  # type: ignore[return-value]


def calibrate_scores(
    scores_path: Path, output: Path, *, labels_path: Path | None = None, model: str | None = None,
    target_fpr: float = 0.01, confidence: float = 0.9, fit: bool = True, holdout: float = 0.0, seed: int = 0,
    label_column: str = LABEL_COLUMN, if_exists: str = "fail", group_column: str | None = None,
    auto_groups: bool = False, search_timesteps: bool = False, device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> tuple[ModelProfile, Calibration]:
    """`memscan calibrate`: fit on a labelled scores file and write the calibrated profile (never over
    an input; over an existing file only with `if_exists="overwrite"`). `group_column` (of the labels
    file, else the scores file) or `auto_groups`: see `calibrate`. `search_timesteps` loads the scores'
    model (on `device`) and chooses the step pair too (memscan.timestep_search)."""
    from memscan.outputs import check_output

    if group_column is not None and auto_groups:
        raise UsageError("give --group-column or --groups auto, not both")
    if search_timesteps and not fit:
        raise UsageError("--search-timesteps fits the weights of the chosen steps; drop --no-fit")
    check_output(output, inputs=[p for p in (scores_path, labels_path) if p is not None], if_exists=if_exists,
                 what="profile")
    frame, facts = load_labelled(scores_path, labels_path, label_column=label_column,
                                 extra_columns=[group_column] if group_column else [])
    textless = "prompt" not in frame or frame["prompt"].isna().all()
    if (auto_groups or search_timesteps) and labels_path is not None and textless:
        labels = read_labels(labels_path, label_column=label_column)  # scores without text: the labels'
        frame = frame.assign(prompt=frame["prompt_id"].astype(str).map(
            labels.drop_duplicates("prompt_id").set_index("prompt_id")["prompt"]).to_numpy())
    weights = None
    if not fit and facts.get("w_norm") is not None and facts.get("method") == "anisotropy":
        weights = (float(facts["w_norm"]), float(facts["w_align"]))
    fit = fit and facts.get("method", "anisotropy") == "anisotropy"
    base = base_profile(facts, model)
    pair = scored_pair(facts, base)
    if search_timesteps:
        frame = with_term_columns(frame, facts, base, pair, device=device, log=log)
    result = calibrate(
        frame, target_fpr=target_fpr, confidence=confidence, fit=fit, weights=weights, holdout=holdout, seed=seed,
        group_column=group_column, auto_groups=auto_groups,
        default_pair=pair,
    )
    profile = calibrated_profile(base, result, location(output).stem, facts, origin=location(scores_path).name)
    write_profile(profile, output)
    return profile, result


def scored_pair(facts: dict[str, Any], base: ModelProfile) -> tuple[int, int]:
    """The (t_hi_index, t_lo_index) the scores were made with: their facts, else the profile's."""
    return int(facts.get("t_hi_index", base.t_hi_index)), int(facts.get("t_lo_index", base.t_lo_index))


def with_term_columns(frame: pd.DataFrame, facts: dict[str, Any], base: ModelProfile, pair: tuple[int, int], *,
                      device: str = "auto", log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """`frame` plus the per-step term columns of the prompts calibration counts (labelled, scored),
    on the model, noise bank and conventions the scores were made with (memscan.timestep_search.
    term_columns), `pair` among the steps; `log` hears what the rescoring costs before it starts,
    and how long it took."""
    import time

    from memscan.models.loading import load_model
    from memscan.timestep_search import grid_for, term_columns

    if facts.get("method", "anisotropy") != "anisotropy":
        raise UsageError(f"--search-timesteps needs anisotropy scores, not {facts.get('method')}")
    frame = frame.reset_index(drop=True)
    counted = usable(frame, "score").index  # only what calibrate counts is rescored, not every unlabelled row
    texts = frame.loc[counted, "prompt"] if "prompt" in frame else pd.Series([None] * len(counted))
    if texts.isna().any():
        raise InputError("--search-timesteps rescores the prompts, and the scores lack their text "
                         "(--no-store-prompt?); pass --labels with the prompts")
    model = load_model(base, device=device, dtype=str(facts.get("dtype") or "auto"))
    steps = int(facts.get("num_inference_steps") or base.num_inference_steps)
    indices = sorted(set(grid_for(steps)) | {i % steps for i in pair})  # the scores' own pair is always a candidate
    n_noise, started = int(facts.get("n_noise") or 1), time.perf_counter()
    prompts = texts.astype(str).nunique()
    if log is not None:
        log(f"searching steps: {prompts} prompts x {len(indices)} steps x {n_noise} noise = "
            f"{prompts * len(indices) * n_noise} UNet evaluations on {model.device}")
    terms = term_columns(
        model, texts.astype(str).tolist(), n_noise=n_noise,
        seed=int(facts.get("seed") if facts.get("seed") is not None else 51), steps=steps, indices=indices,
        v_convention=facts.get("v_convention") or base.v_convention,
        norm_scale=facts.get("norm_scale") or base.norm_scale,
    )
    if log is not None:
        log(f"searched steps in {time.perf_counter() - started:.1f} s")
    return frame.join(terms.set_axis(counted))  # rows calibrate leaves out get no term columns (NaN)


def evaluate_files(
    paths: Sequence[Path], labels_path: Path | None = None, *, columns: Sequence[str] = ("score",),
    targets: Sequence[float] = DEFAULT_TARGETS, label_column: str = LABEL_COLUMN,
) -> list[dict[str, Any]]:
    """`memscan evaluate`: one result dict per (scores file, column), named by method (file on clashes).

    A column missing from some files is skipped there; missing from all, it is an error."""
    loaded = [(location(p), *load_labelled(p, labels_path, label_column=label_column)) for p in paths]
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
