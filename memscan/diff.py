"""What changed between two audits: prompts newly flagged, no longer flagged, added, removed, unscored.

Library behind `memscan diff OLD NEW` and `memscan detect --previous RUN`. Each side is a scores
file or a complete detect run directory (read through its done shards, as `merge` reads them,
without writing a merged file). Rows are matched by `prompt_id`, which must be unique on each side.

Categories (an entry can be in `added` and `newly_flagged` at once; the others do not overlap):

    added              in NEW only
    removed            in OLD only
    newly_flagged      flagged in NEW, not flagged in OLD (absent, scored under the threshold, or unscored)
    no_longer_flagged  flagged in OLD, scored and not flagged in NEW
    still_flagged      flagged in both
    unscored           in NEW with status != ok: its flag is unknown, never counted as unflagged

A flag compares like with like only when both sides were scored the same way; the run facts that
determine the numbers (model, source, revision, method, weights, timesteps, dtype, seed, n_noise,
threshold, ...) are compared and every difference is named (`differences`, `warnings`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from memscan import storage
from memscan.errors import InputError, UsageError
from memscan.io.scores import METADATA_KEY, STATUS_OK
from memscan.storage import Location

REQUIRED_COLUMNS = ("prompt_id", "score", "flagged", "status")
CATEGORIES = ("newly_flagged", "no_longer_flagged", "still_flagged", "added", "removed", "unscored")
ENTRY_COLUMNS = (
    "prompt_id", "prompt", "old_score", "new_score", "old_flagged", "new_flagged", "old_status", "new_status",
)
# facts that say where or when a file was made, not how its numbers were computed; the fingerprint is
# left out too: a run directory's covers its inputs and shard plan, which change whenever the data grows
NOT_COMPARED = frozenset({"memscan_version", "input", "fingerprint", "merged_shards", "complete"})

log = logging.getLogger("memscan")


@dataclass
class ScoreSet:
    """One side of a diff: prompt_id, prompt (when stored), score, flagged, status; its run facts."""

    frame: pd.DataFrame
    facts: dict[str, Any]
    source: str

    def __post_init__(self) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in self.frame.columns]
        if missing:
            raise InputError(f"{self.source}: not a memscan detect output (no column {', '.join(missing)})")
        check_unique_ids(self.frame["prompt_id"], self.source)

    @property
    def has_prompt(self) -> bool:
        return "prompt" in self.frame.columns


def check_unique_ids(ids: pd.Series, source: str) -> None:
    """Refuse repeated prompt_ids: rows are matched by id, and a repeated id matches nothing for sure."""
    repeated = ids[ids.duplicated(keep=False)]
    if len(repeated):
        example = repeated.iloc[0]
        raise InputError(
            f"{source}: prompt_id is not unique ({repeated.nunique()} ids occur more than once, e.g. {example!r}); "
            "rows are matched by prompt_id: give detect an --id-column with one value per prompt"
        )


def load_scores(path: str | Location) -> ScoreSet:
    """A scores file, or a complete detect run directory read through its shards (nothing written);
    local or on a store (memscan.storage)."""
    path = storage.location(path)
    if path.is_dir():
        return _load_run(path)
    if not path.exists():
        raise InputError(f"{path}: no such scores file or run directory")
    try:
        schema = storage.read_schema(path)
        table = storage.read_table(path, columns=_wanted(schema))
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"cannot read scores file {path}: {exc}") from exc
    return ScoreSet(table.to_pandas(), _facts(schema), str(path))


def _load_run(root: Location) -> ScoreSet:
    from memscan.run.rundir import RunDirectory

    run = RunDirectory(root)
    if not run.exists():
        raise InputError(f"{root}: not a scores file or a memscan run directory (no manifest.json)")
    kind = run.manifest().get("kind", "detect")
    if kind != "detect":
        raise InputError(f"{root}: a `memscan {kind}` run, not detect scores")
    _, shards = run.plan()
    done = [s for s in shards if run.is_done(s)]
    if len(done) < len(shards):
        raise InputError(
            f"{root}: {len(shards) - len(done)} of {len(shards)} shards are not done; "
            "a diff needs every row: finish the run (rerun it), or `memscan merge --partial` and diff that file"
        )
    try:
        schema = storage.read_schema(run.shard_path(done[0]))
        columns = _wanted(schema)
        table = pa.concat_tables([storage.read_table(run.shard_path(s), columns=columns) for s in done])
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"cannot read the shards of {root}: {exc}") from exc
    return ScoreSet(table.to_pandas(), _facts(schema), str(root))


def _wanted(schema: pa.Schema) -> list[str]:
    names = set(schema.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InputError(f"not a memscan detect output (no column {', '.join(missing)})")
    return [c for c in ("prompt_id", "prompt", "score", "flagged", "status") if c in names]


def _facts(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


@dataclass
class ScoreDiff:
    """The changes from OLD to NEW: counts, one DataFrame per category, differing run facts, warnings."""

    old_source: str
    new_source: str
    counts: dict[str, int]
    frames: dict[str, pd.DataFrame]
    differences: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    unscored_by_status: dict[str, int] = field(default_factory=dict)
    old_facts: dict[str, Any] = field(default_factory=dict)
    new_facts: dict[str, Any] = field(default_factory=dict)

    @property
    def newly_flagged(self) -> pd.DataFrame:
        return self.frames["newly_flagged"]

    def summary(self) -> dict[str, Any]:
        """The counts and the differing facts, as `detect --previous` puts them in its summary."""
        return {"previous": self.old_source, **self.counts, "unscored_by_status": self.unscored_by_status,
                "differences": {k: {"old": o, "new": n} for k, (o, n) in self.differences.items()}}

    def to_dict(self, limit: int | None = None) -> dict[str, Any]:
        """A stable JSON object: both sides, counts, differences, warnings, then each category's entries
        (at most `limit` each, highest score first; `limit` None: all)."""
        out: dict[str, Any] = {
            "old": self._side(self.old_source, self.old_facts, self.counts["old_rows"]),
            "new": self._side(self.new_source, self.new_facts, self.counts["new_rows"]),
            "counts": dict(self.counts),
            "unscored_by_status": dict(self.unscored_by_status),
            "differences": {k: {"old": o, "new": n} for k, (o, n) in self.differences.items()},
            "warnings": list(self.warnings),
            "limit": limit,
        }
        for name in CATEGORIES:
            frame = self.frames[name] if limit is None else self.frames[name].head(limit)
            out[name] = entries(frame)
        return out

    def line(self) -> str:
        """The one-line summary."""
        return counts_line(self.counts)

    @staticmethod
    def _side(source: str, facts: dict[str, Any], rows: int) -> dict[str, Any]:
        return {"source": source, "rows": rows, "model": facts.get("model"), "method": facts.get("method"),
                "threshold": facts.get("threshold"), "fingerprint": facts.get("fingerprint")}


def counts_line(c: dict[str, Any]) -> str:
    """'N newly flagged, ... (OLD -> NEW rows)': the counts of a diff (or of a summary's `changes`)."""
    return (
        f"{c['newly_flagged']} newly flagged, {c['no_longer_flagged']} no longer flagged, "
        f"{c['still_flagged']} still flagged, {c['added']} added, {c['removed']} removed, "
        f"{c['unscored']} unscored ({c['old_rows']} -> {c['new_rows']} rows)"
    )


def entries(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A category's rows as JSON-ready dicts (NaN and missing values become None)."""
    return [{k: _plain(v) for k, v in row.items()} for row in frame[list(ENTRY_COLUMNS)].to_dict("records")]


def _plain(value: Any) -> Any:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.floating | float):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def fact_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The run facts that determine the numbers and differ between two outputs."""
    keys = sorted((set(old) | set(new)) - NOT_COMPARED)
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def _state(frame: pd.DataFrame, prefix: str, present: pd.Series) -> np.ndarray:
    """absent, unscored (status != ok), flagged, or not_flagged (scored: under the threshold, or none)."""
    status = frame[f"{prefix}_status"]
    flagged = frame[f"{prefix}_flagged"].astype("boolean").fillna(False).to_numpy(dtype=bool)
    return np.select(
        [~present.to_numpy(), (status != STATUS_OK).to_numpy(), flagged],
        ["absent", "unscored", "flagged"],
        "not_flagged",
    )


def diff_scores(old: ScoreSet | str | Path, new: ScoreSet | str | Path) -> ScoreDiff:
    """Match OLD and NEW by prompt_id and sort every prompt into the categories of this module."""
    old = old if isinstance(old, ScoreSet) else load_scores(old)
    new = new if isinstance(new, ScoreSet) else load_scores(new)
    sides = []
    for prefix, side in (("old", old), ("new", new)):
        frame = side.frame.rename(columns={c: f"{prefix}_{c}" for c in side.frame.columns if c != "prompt_id"})
        frame[f"{prefix}_row"] = np.arange(len(frame))
        sides.append(frame)
    merged = sides[0].merge(sides[1], on="prompt_id", how="outer", indicator=True, sort=False)
    in_old = merged["_merge"] != "right_only"
    in_new = merged["_merge"] != "left_only"
    old_state = _state(merged, "old", in_old)
    new_state = _state(merged, "new", in_new)
    old_prompt = merged["old_prompt"] if "old_prompt" in merged else pd.Series(None, index=merged.index, dtype=object)
    new_prompt = merged["new_prompt"] if "new_prompt" in merged else pd.Series(None, index=merged.index, dtype=object)
    merged["prompt"] = new_prompt.where(new_prompt.notna(), old_prompt)
    for column in ENTRY_COLUMNS:
        if column not in merged:
            merged[column] = None
    masks = {
        "newly_flagged": (new_state == "flagged") & (old_state != "flagged"),
        "no_longer_flagged": (old_state == "flagged") & (new_state == "not_flagged"),
        "still_flagged": (old_state == "flagged") & (new_state == "flagged"),
        "added": old_state == "absent",
        "removed": new_state == "absent",
        "unscored": new_state == "unscored",
    }
    order = {  # highest score first where there is one; unscored rows in NEW's order
        "newly_flagged": ("new_score", False), "no_longer_flagged": ("old_score", False),
        "still_flagged": ("new_score", False), "added": ("new_score", False), "removed": ("old_score", False),
        "unscored": ("new_row", True),
    }
    frames = {}
    for name, mask in masks.items():
        by, ascending = order[name]
        frames[name] = (merged[mask].sort_values(by, ascending=ascending, kind="stable", na_position="last")
                        .reset_index(drop=True)[list(ENTRY_COLUMNS)])
    both = in_old & in_new
    changed_text = both & old_prompt.notna() & new_prompt.notna() & (old_prompt != new_prompt)
    counts = {
        "old_rows": len(old.frame), "new_rows": len(new.frame), "matched": int(both.sum()),
        **{name: int(mask.sum()) for name, mask in masks.items()},
        "prompt_changed": int(changed_text.sum()),
    }
    unscored = frames["unscored"]["new_status"].value_counts()
    differences = fact_differences(old.facts, new.facts)
    result = ScoreDiff(
        old_source=old.source, new_source=new.source, counts=counts, frames=frames, differences=differences,
        unscored_by_status={str(k): int(v) for k, v in unscored.items()}, old_facts=old.facts, new_facts=new.facts,
    )
    result.warnings = _warnings(result, old, new)
    return result


def _warnings(result: ScoreDiff, old: ScoreSet, new: ScoreSet) -> list[str]:
    out = []
    if result.differences:
        named = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in result.differences.items())
        out.append(f"{old.source} and {new.source} were scored differently ({named}): "
                   "'newly flagged' and 'no longer flagged' compare different rules")
    for side in (old, new):
        if not side.facts:
            out.append(f"{side.source} carries no run facts: cannot tell how it was scored")
        elif side.facts.get("threshold") is None:
            out.append(f"{side.source} was scored without a threshold: none of its prompts is flagged")
    c = result.counts
    if c["old_rows"] and c["new_rows"] and not c["matched"]:
        out.append("no prompt_id is in both: ids made from file names and rows (FILE:ROW) change with the file; "
                   "give detect an --id-column")
    if c["prompt_changed"]:
        out.append(f"{c['prompt_changed']} prompt_ids hold a different prompt in {new.source} than in {old.source}")
    return out


def check_strict(result: ScoreDiff) -> None:
    """`--strict`: outputs scored differently are an error, not a warning."""
    if result.differences:
        named = ", ".join(result.differences)
        raise UsageError(f"{result.old_source} and {result.new_source} were scored differently ({named}); "
                         "drop --strict to compare them anyway")


# --------------------------------------------------------------------------- detect --previous


def read_previous(
    previous: str | Location, output: str | Location | None = None, *, run_directory: bool = False
) -> ScoreSet:
    """`detect --previous`: read and checked before any scoring, so a bad one costs nothing.

    A file output may be its own previous (it is read before it is replaced); a run directory may
    not, since it is resumed, not replaced."""
    if run_directory and output is not None and storage.same_location(previous, output):
        raise UsageError(f"--previous {previous} is the run directory being written; give the last run's output")
    return load_scores(previous)


def changes_since(previous: ScoreSet, current: ScoreSet) -> dict[str, Any]:
    """The `changes` entry of a detect summary (counts, differing facts); warnings go to the log."""
    result = diff_scores(previous, current)
    for warning in result.warnings:
        log.warning("%s", warning)
    return result.summary()
