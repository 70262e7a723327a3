"""The contact sheet: each prompt's k generations in a row, the training match beside them, one HTML page.

Each prompt's images are one PNG strip (embedded as a data URI, so the page opens anywhere
offline). Rows are sorted by the decision distance, lowest (most copy-like) first, with a line
where the threshold falls, so the gap between copies and the rest is what one sees first.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

THUMB_SIDE = 96  # thumbnails are downsampled to at most this side
SHEET_ROWS = 500  # the most prompts one page shows (the lowest decision distances)


def _thumb(image: np.ndarray, side: int) -> np.ndarray:
    """(3, H, W) [0, 1] -> (h, w, 3) uint8, area-averaged down to at most `side`."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    if x.shape[-1] > side:
        x = F.adaptive_avg_pool2d(x, (side, side))
    return (x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def strip_png(generations: np.ndarray, match: np.ndarray | None = None, *, side: int = THUMB_SIDE) -> bytes:
    """One PNG: the k generations (k, 3, H, W) side by side, then a gap and the training match."""
    from PIL import Image

    tiles = [_thumb(g, side) for g in generations]
    height = tiles[0].shape[0]
    gap = np.full((height, max(2, height // 8), 3), 255, np.uint8)
    row = [t for tile in tiles for t in (tile, gap[:, :2])][:-1]
    if match is not None:
        row += [gap, _thumb(match, side)]
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(row, axis=1)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def decision_distance(frame: pd.DataFrame) -> np.ndarray:
    """Per row: min(cluster_distance, train_distance), the number the label thresholds."""
    cluster = frame["cluster_distance"].to_numpy(dtype=np.float64)
    if "train_distance" not in frame:
        return cluster
    return np.fmin(cluster, frame["train_distance"].to_numpy(dtype=np.float64))


def _number(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return ""
    return "" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4g}")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: middle; }
th { background: #f4f4f4; } tr.mem td { background: #fdecea; } tr.cut td { border-top: 3px solid #000; }
img { image-rendering: pixelated; height: 72px; } .facts { font-size: 12px; color: #555; }
"""


def build_sheet(frame: pd.DataFrame, *, threshold: float, facts: dict[str, Any], title: str = "memscan confirm",
                limit: int = SHEET_ROWS) -> str:
    """The page for rows with a `sheet_png` column; the `limit` lowest decision distances."""
    rows = frame[frame["sheet_png"].notna()].copy() if "sheet_png" in frame else frame.iloc[0:0]
    rows["decision"] = decision_distance(rows)
    rows = rows.sort_values("decision", kind="stable", na_position="last").head(limit)
    shown = " · ".join(f"{k}: <code>{html.escape(str(v))}</code>" for k, v in facts.items() if v is not None)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><p class='facts'>{shown}</p>",
             f"<p>{len(rows)} of {len(frame)} prompts, lowest decision distance first; a prompt is memorized below "
             f"{threshold:g} (the thick line). Each row: the generations, then the nearest training image.</p>",
             "<table><tr><th>#</th><th>label</th><th>decision distance</th><th>cluster / mean pair distance</th>"
             "<th>train distance (id)</th><th>prompt</th><th>generations | train match</th></tr>"]
    cut_done = False
    for rank, row in enumerate(rows.itertuples(index=False), 1):
        classes = ["mem"] if row.label == "memorized" else []
        if not cut_done and not (row.decision < threshold):
            cut_done = True
            if rank > 1:
                classes.append("cut")
        image = "data:image/png;base64," + base64.b64encode(row.sheet_png).decode("ascii")
        train = getattr(row, "train_id", None)
        train_cell = f"{_number(getattr(row, 'train_distance', None))} ({html.escape(str(train))})" if train else ""
        parts.append(
            f"<tr class='{' '.join(classes)}'><td>{rank}</td><td>{html.escape(str(row.label))}</td>"
            f"<td>{_number(row.decision)}</td>"
            f"<td>{_number(row.cluster_distance)} / {_number(row.pair_distance_mean)}</td><td>{train_cell}</td>"
            f"<td>{html.escape(str(getattr(row, 'prompt', '') or ''))}<br>"
            f"<small>{html.escape(str(row.prompt_id))}</small></td>"
            f"<td><img alt='generations' src='{image}'></td></tr>"
        )
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_contact_sheet(frame: pd.DataFrame, path: str | Path, *, threshold: float, facts: dict[str, Any],
                        title: str = "memscan confirm") -> Path:
    """Write the page atomically (the caller checked the output location before the work)."""
    from memscan.outputs import atomic_write_bytes

    page = build_sheet(frame, threshold=threshold, facts=facts, title=title)
    from memscan.storage import location

    atomic_write_bytes(location(path), lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return location(path)  # type: ignore[return-value]
