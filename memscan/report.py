"""`memscan report`: one self-contained HTML page to look at instead of a table.

Per scores file (one per method): the score histogram (memorized and not, where labels exist) with
the threshold, the ROC curves of all methods (linear and log FPR), the metrics table, and the top
flagged prompts. Per guard check summary (`python -m memscan.guard_check --json`): the policies'
comparison table and the trade-off plot, copy rate against attribute agreement, one point per
policy and check. Figures are PNGs embedded as data URIs, so the file opens anywhere offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.errors import InputError, UsageError, one_line
from memscan.evaluate import CONVENTIONS, Evaluation, evaluate_frame, usable
from memscan.storage import location

_MEMORIZED, _CLEAN, _ALL = "#d62728", "#1f77b4", "#7f7f7f"


@dataclass
class ReportInput:
    """One method's scores (with a float `label` column where labels exist) and its run facts."""

    name: str
    scores: pd.DataFrame
    facts: dict[str, Any]
    threshold: float | None = None

    @property
    def labelled(self) -> bool:
        return "label" in self.scores and bool(self.scores["label"].notna().any())

    @property
    def evaluable(self) -> bool:
        """Both classes present among the scored rows, so a ROC curve exists."""
        return self.labelled and usable(self.scores)["label"].nunique() == 2


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def histogram_png(item: ReportInput, evaluation: Evaluation | None) -> str:
    """Score histogram, memorized vs not where labelled, with the threshold line(s)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2, 3.2))
    ax = figure.subplots()
    rows = usable(item.scores) if item.labelled else item.scores[np.isfinite(item.scores["score"].to_numpy(float))]
    scores = rows["score"].to_numpy(float)
    bins = np.histogram_bin_edges(scores, bins=min(40, max(10, len(scores) // 5)))
    if item.labelled:
        labels = rows["label"].to_numpy()
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, color=_CLEAN, label=f"not memorized ({(labels == 0).sum()})")
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, color=_MEMORIZED, label=f"memorized ({(labels == 1).sum()})")
    else:
        ax.hist(scores, bins=bins, color=_ALL, label=f"all prompts ({len(scores)})")
    if item.threshold is not None:
        ax.axvline(item.threshold, color="black", linestyle="-", label=f"threshold {item.threshold:.4g}")
    if evaluation is not None:
        point = evaluation.point(evaluation.points[0].target_fpr, "below")
        ax.axvline(point.threshold, color="black", linestyle="--",
                   label=f"{point.target_fpr:.0%} FPR here ({point.threshold:.4g})")
    ax.set_xlabel("score (higher = more likely memorized)")
    ax.set_ylabel("prompts")
    ax.set_title(item.name)
    ax.legend(fontsize=8)
    return _png(figure)


def roc_png(evaluations: Sequence[Evaluation]) -> str:
    """ROC curves of all methods: linear axes and log FPR (where the 1% point lives)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    linear, logx = figure.subplots(1, 2)
    targets = sorted({p.target_fpr for e in evaluations for p in e.points})
    left = min([1.0 / max(e.n_not_memorized, 1) for e in evaluations] + targets) / 2
    for evaluation in evaluations:
        label = f"{evaluation.name} (AUC {evaluation.auc:.3f})"
        linear.plot(evaluation.roc_fpr, evaluation.roc_tpr, label=label)  # ties are diagonal segments
        logx.plot(np.maximum(evaluation.roc_fpr, left), evaluation.roc_tpr, label=label)  # FPR 0 at the edge
    linear.plot([0, 1], [0, 1], color="lightgrey", linestyle=":")
    logx.set_xscale("log")
    logx.set_xlim(left, 1)
    for ax, title in ((linear, "ROC"), (logx, "ROC, log FPR")):
        for target in targets:
            ax.axvline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8, loc="lower right")
    return _png(figure)


def _metrics_table(evaluations: Sequence[Evaluation]) -> str:
    targets = sorted({p.target_fpr for e in evaluations for p in e.points})
    head = "".join(
        f"<th>TPR@{t:.0%}FPR {c}<br><small>(FPR, threshold)</small></th>" for t in targets for c in CONVENTIONS
    )
    body = []
    for e in evaluations:
        cells = "".join(
            f"<td>{p.tpr:.3f}<br><small>({p.fpr:.3f}, &gt;{p.threshold:.4g})</small></td>"
            for t in targets for p in (e.point(t, c) for c in CONVENTIONS)
        )
        body.append(f"<tr><td>{html.escape(e.name)}</td><td>{e.n_memorized}</td><td>{e.n_not_memorized}</td>"
                    f"<td>{e.auc:.3f}</td>{cells}</tr>")
    notes = "".join(f"<li><b>{c}</b>: {html.escape(text)}</li>" for c, text in CONVENTIONS.items())
    return (f"<table><tr><th>method</th><th>memorized</th><th>not</th><th>AUC</th>{head}</tr>{''.join(body)}</table>"
            f"<ul class='note'>{notes}<li>flag rule: score &gt; threshold</li></ul>")


def _top_table(item: ReportInput, top: int) -> str:
    rows = item.scores[np.isfinite(item.scores["score"].to_numpy(float))]
    rows = rows.sort_values("score", ascending=False, kind="stable").head(top)
    has_label = item.labelled
    head = "<tr><th>#</th><th>score</th><th>flagged</th>" + ("<th>label</th>" if has_label else "") + \
        "<th>prompt_id</th><th>prompt</th></tr>"
    body = []
    for rank, row in enumerate(rows.itertuples(index=False), 1):
        flagged = getattr(row, "flagged", None)
        if item.threshold is not None:
            flagged = row.score > item.threshold
        mark = "" if flagged is None or pd.isna(flagged) else ("yes" if flagged else "no")
        label = ""
        if has_label:
            value = row.label
            label = f"<td>{'' if pd.isna(value) else ('memorized' if value == 1 else 'not')}</td>"
        prompt = html.escape(str(getattr(row, "prompt", "") or ""))
        body.append(f"<tr class='{'hit' if mark == 'yes' else ''}'><td>{rank}</td><td>{row.score:.4g}</td>"
                    f"<td>{mark}</td>{label}<td>{html.escape(str(row.prompt_id))}</td><td>{prompt}</td></tr>")
    return f"<table class='top'>{head}{''.join(body)}</table>"


def _facts(item: ReportInput) -> str:
    keys = ("model", "source", "method", "prediction_type", "n_noise", "seed", "dtype", "w_norm", "w_align",
            "steps", "v_convention", "norm_scale", "threshold", "memscan_version")
    shown = {k: item.facts[k] for k in keys if item.facts.get(k) is not None}
    text = " · ".join(f"{k}: <code>{html.escape(str(v))}</code>" for k, v in shown.items())
    return f"<p class='facts'>{text}</p>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1150px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } tr.hit td { background: #fdecea; }
.facts, .note { font-size: 12px; color: #555; } img { max-width: 100%; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; } .grid > div { flex: 1 1 520px; }
"""


def build_report(
    items: Sequence[ReportInput], *, title: str = "memscan report", top: int = 20,
    guard_checks: Mapping[str, dict[str, Any]] | None = None,
) -> str:
    """The whole page as one HTML string: the scores files' sections, then the guard checks'."""
    evaluations = {item.name: evaluate_frame(item.scores, ("score",), name=item.name)[0]
                   for item in items if item.evaluable}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if evaluations:
        parts.append("<h2>Detection quality</h2>" + _metrics_table(list(evaluations.values())))
        parts.append(f"<img alt='ROC curves' src='{roc_png(list(evaluations.values()))}'>")
    if items:
        parts.append("<h2>Score distributions</h2><div class='grid'>")
        for item in items:
            image = histogram_png(item, evaluations.get(item.name))
            parts.append(f"<div><img alt='histogram of {html.escape(item.name)}' src='{image}'>{_facts(item)}</div>")
        parts.append("</div>")
    for item in items:
        parts.append(f"<h2>Top {top} prompts: {html.escape(item.name)}</h2>{_top_table(item, top)}")
    if guard_checks:
        parts.append(guard_section(guard_checks))
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------- guard checks

GUARD_COLUMNS = (
    ("memorized_flagged", "mem. flagged"), ("memorized_generation_copy_rate", "mem. copy rate"),
    ("memorized_prompts_copying", "mem. prompts copying"), ("stopped_copying_of_copying_unguarded", "stopped copying"),
    ("attribute_agreement_ratio", "agreement / unguarded"), ("memorized_similarity", "mem. similarity"),
    ("similarity_measure", "similarity of"), ("memorized_blocked", "mem. blocked"), ("clean_flagged", "clean flagged"),
    ("clean_bit_identical", "clean bit-identical"), ("seconds_per_image", "s / image"),
    ("guard_seconds_per_image", "guard s / image"),
)
_COPY, _AGREEMENT = "memorized_generation_copy_rate", "attribute_agreement_ratio"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_guard_summary(summary: Any, where: str = "guard check") -> dict[str, Any]:
    """`summary` if it is a guard check summary the page can show, else a one-line UsageError."""
    bad = f"{where}: not a `python -m memscan.guard_check --json` summary"
    if not isinstance(summary, dict):
        raise UsageError(f"{bad}: a JSON {type(summary).__name__}, not an object")
    policies = summary.get("policies")
    if not isinstance(policies, dict) or not policies:
        raise UsageError(f"{bad}: no 'policies' object")
    for policy, row in policies.items():
        if not isinstance(row, dict):
            raise UsageError(f"{bad}: policy {policy!r} is not an object")
        if not _is_number(row.get(_COPY)):
            raise UsageError(f"{bad}: policy {policy!r} has no number {_COPY!r}")
        if row.get(_AGREEMENT) is not None and not _is_number(row[_AGREEMENT]):
            raise UsageError(f"{bad}: policy {policy!r}: {_AGREEMENT!r} is neither a number nor null")
    return summary


def read_guard_check(path: str | Path) -> dict[str, Any]:
    """The summary a guard check wrote with --json (a path or URL), checked by `check_guard_summary`."""
    where = location(path)
    try:
        text = where.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read guard check {path}: {one_line(exc)}") from exc
    try:
        summary = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"guard check {path} is not JSON: {one_line(exc)}") from None
    return check_guard_summary(summary, f"guard check {path}")


def _label(policy: str, name: str, several: bool) -> str:
    """A point's label, `$` escaped so that matplotlib draws it as written (no mathtext)."""
    return (f"{policy} ({name})" if several else policy).replace("$", r"\$")


def tradeoff_png(checks: Mapping[str, dict[str, Any]]) -> str:
    """Memorized copy rate vs agreement ratio, a labelled point per policy and check (block: agreement 0)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.6, 3.8))
    ax = figure.subplots()
    colours = {p: f"C{i % 10}" for i, p in enumerate(dict.fromkeys(p for s in checks.values() for p in s["policies"]))}
    markers = "osD^vP*X"
    labels: dict[tuple[float, float], list[str]] = {}  # points that coincide share one label
    for k, (name, summary) in enumerate(checks.items()):
        for policy, row in summary["policies"].items():
            x, ratio = row[_COPY], row.get(_AGREEMENT)
            y = 0.0 if ratio is None else ratio
            ax.scatter(x, y, s=40, color=colours[policy], marker=markers[k % len(markers)])
            labels.setdefault((x, y), []).append(_label(str(policy), str(name), len(checks) > 1))
    placed: list[tuple[float, float]] = []
    for point, names in labels.items():  # a label near an earlier one steps down a line, not over it
        near = sum(abs(point[0] - x) < 0.15 and abs(point[1] - y) < 0.08 for x, y in placed)
        ax.annotate(", ".join(names), point, textcoords="offset points", xytext=(5, 4 - 11 * near), fontsize=8)
        placed.append(point)
    ax.axhline(0.7, color="grey", linestyle="--", linewidth=0.8, label="target: 70% of unguarded agreement")
    ax.set_xlabel("copy rate of memorized prompts' generations")
    ax.set_ylabel("attribute agreement / unguarded")
    ax.set_title("guard policies: copying vs intent kept")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.05, 1.25)
    ax.legend(fontsize=8, loc="upper center")  # the free band: points sit at or below agreement 1.0
    return _png(figure)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def guard_markdown_table(summary: dict[str, Any]) -> str:
    """A guard check's per-policy summary as a Markdown table (the README's)."""
    head = "| policy | " + " | ".join(name for _, name in GUARD_COLUMNS) + " |"
    rule = "|---" * (len(GUARD_COLUMNS) + 1) + "|"
    body = [f"| {policy} | " + " | ".join(_cell(row.get(key)) for key, _ in GUARD_COLUMNS) + " |"
            for policy, row in summary["policies"].items()]
    return "\n".join([head, rule, *body])


def _guard_table(summary: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for _, name in GUARD_COLUMNS)
    body = "".join(
        f"<tr><td>{html.escape(str(policy))}</td>"
        + "".join(f"<td>{html.escape(_cell(row.get(key)))}</td>" for key, _ in GUARD_COLUMNS) + "</tr>"
        for policy, row in summary["policies"].items())
    return f"<table class='guard'><tr><th>policy</th>{head}</tr>{body}</table>"


def guard_section(checks: Mapping[str, dict[str, Any]]) -> str:
    """The guard checks' part of a page: the trade-off plot, then each check's counts, table and settings."""
    parts = ["<h2>Guarded generation: copying vs intent</h2>",
             f"<img alt='copy rate vs attribute agreement' src='{tradeoff_png(checks)}'>"]
    for name, summary in checks.items():
        counts = [f"{summary[key]} {what}" for key, what in (("memorized", "memorized prompts"),
                                                              ("clean", "clean prompts")) if key in summary]
        if "images_per_prompt" in summary:
            counts.append(f"{summary['images_per_prompt']} images each")
        heading = f"<h3>{html.escape(str(name))}</h3>" if len(checks) > 1 else ""
        line = f"<p>{html.escape(', '.join(counts))}.</p>" if counts else ""
        settings = html.escape(json.dumps(summary.get("settings", {})))
        parts.append(f"{heading}{line}{_guard_table(summary)}<p class='facts'>settings: <code>{settings}</code></p>")
    return "\n".join(parts)


def load_report_inputs(
    paths: Sequence[Path], *, labels: Path | None = None, label_column: str = "label",
    threshold: float | None = None,
) -> list[ReportInput]:
    """Scores files (and optional labels) as report inputs named by method, or file name on clashes."""
    from memscan.evaluate import attach_labels, parse_labels, read_labels
    from memscan.io.scores import read_scores

    label_frame = read_labels(labels, label_column=label_column) if labels is not None else None
    items = []
    for path in paths:
        scores, facts = read_scores(location(path))
        if label_frame is not None:
            scores = attach_labels(scores, label_frame)
        elif label_column in scores:
            scores = scores.assign(label=parse_labels(scores[label_column]))
        items.append(ReportInput(name=str(facts.get("method") or location(path).stem), scores=scores, facts=facts,
                                 threshold=threshold if threshold is not None else facts.get("threshold")))
    names = [item.name for item in items]
    for item, path in zip(items, paths, strict=True):
        if names.count(item.name) > 1:
            item.name = location(path).stem
    return items


def load_guard_checks(paths: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """Guard check summaries by file name (the whole path where two share a name)."""
    stems = [location(p).stem for p in paths]
    return {(stem if stems.count(stem) == 1 else str(p)): read_guard_check(p)
            for stem, p in zip(stems, paths, strict=True)}


def write_report(
    items: Sequence[ReportInput], output: Path, *, inputs: Sequence[Path] = (), if_exists: str = "fail",
    **kwargs: Any,
) -> Path:
    """Render and write the page atomically: never over one of `inputs`, over an existing file only
    with `if_exists="overwrite"`."""
    from memscan.outputs import atomic_write_bytes, check_output

    check_output(output, inputs=inputs, if_exists=if_exists, what="report")
    page = build_report(items, **kwargs)
    atomic_write_bytes(location(output), lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return location(output)  # type: ignore[return-value]
