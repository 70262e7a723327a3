"""`memscan report`: one self-contained HTML page to look at instead of a table.

Per scores file (one per method): the score histogram (memorized and not, where labels exist) with
the threshold, the ROC curves of all methods (linear and log FPR), the metrics table, and the top
flagged prompts. Figures are PNGs embedded as data URIs, so the file opens anywhere offline.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

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


def build_report(items: Sequence[ReportInput], *, title: str = "memscan report", top: int = 20) -> str:
    """The whole page as one HTML string."""
    evaluations = {item.name: evaluate_frame(item.scores, ("score",), name=item.name)[0]
                   for item in items if item.evaluable}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if evaluations:
        parts.append("<h2>Detection quality</h2>" + _metrics_table(list(evaluations.values())))
        parts.append(f"<img alt='ROC curves' src='{roc_png(list(evaluations.values()))}'>")
    parts.append("<h2>Score distributions</h2><div class='grid'>")
    for item in items:
        image = histogram_png(item, evaluations.get(item.name))
        parts.append(f"<div><img alt='histogram of {html.escape(item.name)}' src='{image}'>{_facts(item)}</div>")
    parts.append("</div>")
    for item in items:
        parts.append(f"<h2>Top {top} prompts: {html.escape(item.name)}</h2>{_top_table(item, top)}")
    parts.append("</body></html>")
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
