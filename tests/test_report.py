"""The HTML report: self-contained structure, escaping, the command, and a Chromium screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from memscan.cli import app
from memscan.report import ReportInput, build_report, write_report


def _item(name: str, seed: int, labelled: bool = True, threshold: float | None = 1.5) -> ReportInput:
    rng = np.random.default_rng(seed)
    label = np.r_[np.ones(30), np.zeros(70)]
    frame = pd.DataFrame({
        "prompt_id": [f"p:{i}" for i in range(100)],
        "prompt": [f"prompt {i}" for i in range(99)] + ["<script>alert(1)</script> & co"],
        "score": (rng.normal(size=100) + 2 * label).astype("float32"),
        "status": "ok",
    })
    frame.loc[99, "score"] = 9.0  # the odd prompt tops the list
    if labelled:
        frame["label"] = label
    return ReportInput(name=name, scores=frame, facts={"method": name, "n_noise": 1}, threshold=threshold)


def test_report_structure_with_labels() -> None:
    page = build_report([_item("anisotropy", 0), _item("wen", 1)], title="t<1>", top=5)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3  # ROC (both methods) + one histogram per method
    assert "alt='ROC curves'" in page and "Detection quality" in page and "t&lt;1&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page and "<script>" not in page
    assert page.count("<table class='top'>") == 2 and "Wen et al." in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from the network


def test_report_without_labels_has_histograms_only() -> None:
    page = build_report([_item("anisotropy", 0, labelled=False, threshold=None)])
    assert "ROC" not in page and page.count("data:image/png;base64,") == 1
    assert "flagged" in page


def test_report_command_on_detect_output(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    scores = tmp_path / "scores.parquet"
    result = runner.invoke(app, ["detect", str(prompts_csv), "-o", str(scores), "--model", str(tiny_model_dir),
                                 "--threshold", "0"])
    assert result.exit_code == 0, result.output
    labels = tmp_path / "labels.csv"
    texts = ["a photo of a cat", "the mona lisa by leonardo da vinci", "a red square on a blue background"]
    pd.DataFrame({"prompt": texts, "label": [0, 1, 0]}).to_csv(labels, index=False)
    out = tmp_path / "r.html"
    result = runner.invoke(app, ["report", str(scores), "--labels", str(labels), "-o", str(out), "--top", "3"])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 2  # ROC + histogram
    assert "Top 3 prompts: anisotropy" in page and page.count("<td>yes</td>") == 3  # threshold 0 flags these


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = write_report([_item("anisotropy", 0), _item("wen", 1)], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}",
             f"--screenshot={shot}", "--window-size=1200,1600"]
    subprocess.run([_chromium(), *flags, page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (1600, 1200)
    coloured = (np.abs(pixels[..., 0] - pixels[..., 2]) > 0.3).mean()  # red/blue histogram bars and curves
    assert coloured > 0.005


def test_one_class_labels_give_histograms_without_roc() -> None:
    item = _item("anisotropy", 0)
    item.scores["label"] = 0.0
    page = build_report([item])
    assert "ROC" not in page and page.count("data:image/png") == 1
