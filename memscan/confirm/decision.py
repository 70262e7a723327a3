"""Is a prompt memorized? Carlini et al. 2023's extraction criterion on k generations.

A prompt is memorized when its generations from independent seeds are near-duplicates of each
other: at least `m` of the k form one connected set under the distance threshold (single
linkage: every image of the set is within the threshold of another one of it). Carlini et al.
ask for a clique of 10 among 500 generations; with k = 4 the default m is 2 ("half the
generations are one image"). Where training images are given, a prompt is also memorized when
`m` of its generations lie within the threshold of the same training image.

Each rule reduces to one number per prompt, so the label is a threshold on it and a user can
see the gap: `cluster_distance`, the smallest threshold at which m generations join (the
single-linkage merge height), and `train_distance`, the m-th closest generation to the best
training image. `memorized = min(cluster_distance, train_distance) < threshold`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from memscan.confirm.embedders import Metric, distances

MEMORIZED, NOT_MEMORIZED = "memorized", "not_memorized"


def default_min_cluster(k: int) -> int:
    """Generations that must be one image: half of k, at least 2."""
    return max(2, math.ceil(k / 2))


def merge_distance(pairwise: np.ndarray, m: int) -> float:
    """The single-linkage height at which `m` of the images first form one connected set."""
    k = len(pairwise)
    if m <= 1:
        return 0.0
    if m > k:
        return math.inf
    parent = list(range(k))
    size = [1] * k

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows, cols = np.triu_indices(k, 1)
    for edge in np.argsort(pairwise[rows, cols], kind="stable"):
        a, b = root(int(rows[edge])), root(int(cols[edge]))
        if a != b:
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
            if size[a] >= m:
                return float(pairwise[rows[edge], cols[edge]])
    return math.inf


def largest_cluster(pairwise: np.ndarray, threshold: float) -> int:
    """Size of the largest connected set of images joined by distances under `threshold`."""
    k = len(pairwise)
    seen = [False] * k
    best = 0
    for start in range(k):
        if seen[start]:
            continue
        stack, count = [start], 0
        seen[start] = True
        while stack:
            i = stack.pop()
            count += 1
            for j in range(k):
                if not seen[j] and j != i and pairwise[i, j] < threshold:
                    seen[j] = True
                    stack.append(j)
        best = max(best, count)
    return best


def is_memorized(cluster_distance: Any, train_distance: Any, threshold: float) -> bool:
    """The label from the two statistics (a missing train distance does not count)."""
    values = [v for v in (cluster_distance, train_distance) if v is not None and not _isnan(v)]
    return bool(values) and min(values) < threshold


def _isnan(value: Any) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def prompt_evidence(
    vectors: np.ndarray, metric: Metric, threshold: float, min_cluster: int, *,
    train_vectors: np.ndarray | None = None, train_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The label and its evidence for one prompt's k generation embeddings (k, D)."""
    k = len(vectors)
    pairwise = distances(vectors, vectors, metric)
    upper = pairwise[np.triu_indices(k, 1)]
    cluster = merge_distance(pairwise, min_cluster)
    row: dict[str, Any] = {
        "cluster_distance": cluster,
        "largest_cluster": largest_cluster(pairwise, threshold),
        "near_duplicate_fraction": float((upper < threshold).mean()) if len(upper) else math.nan,
        "pair_distance_mean": float(upper.mean()) if len(upper) else math.nan,
        "pair_distance_min": float(upper.min()) if len(upper) else math.nan,
        "pair_distance_max": float(upper.max()) if len(upper) else math.nan,
        "train_distance": math.nan, "train_id": None, "train_matches": None, "nearest_train_distance": math.nan,
    }
    if train_vectors is not None and len(train_vectors):
        to_train = distances(vectors, train_vectors, metric)  # (k, N)
        m = min(min_cluster, k)
        mth = np.sort(to_train, axis=0)[m - 1]  # per training image: its m-th closest generation
        best = int(np.argmin(mth))
        row.update({
            "train_distance": float(mth[best]),
            "train_id": str(train_ids[best]) if train_ids is not None else str(best),
            "train_matches": int((to_train[:, best] < threshold).sum()),
            "nearest_train_distance": float(to_train.min()),
        })
    row["label"] = MEMORIZED if is_memorized(cluster, row["train_distance"], threshold) else NOT_MEMORIZED
    row["reason"] = _reason(cluster, row["train_distance"], threshold)
    return row


def _reason(cluster: float, train: float, threshold: float) -> str:
    """Which rule said memorized: near_duplicates, train_match, both, or '' (none)."""
    parts = []
    if cluster < threshold:
        parts.append("near_duplicates")
    if not math.isnan(train) and train < threshold:
        parts.append("train_match")
    return "both" if len(parts) == 2 else (parts[0] if parts else "")
