"""The HTML report: self-contained structure, escaping, the command, guard checks, and Chromium screenshots."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from memscan import report
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


def _screenshot(page: Path, shot: Path, *, height: int) -> np.ndarray:
    """The page as headless Chromium draws it in a 1200-pixel-wide window, as an RGB(A) array."""
    from matplotlib.image import imread

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}",
             f"--screenshot={shot}", f"--window-size=1200,{height}"]
    subprocess.run([_chromium(), *flags, page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    return imread(shot)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = write_report([_item("anisotropy", 0), _item("wen", 1)], tmp_path / "report.html")
    pixels = _screenshot(page, tmp_path / "shot.png", height=1600)
    assert pixels.shape[:2] == (1600, 1200)
    coloured = (np.abs(pixels[..., 0] - pixels[..., 2]) > 0.3).mean()  # red/blue histogram bars and curves
    assert coloured > 0.005


def test_one_class_labels_give_histograms_without_roc() -> None:
    item = _item("anisotropy", 0)
    item.scores["label"] = 0.0
    page = build_report([item])
    assert "ROC" not in page and page.count("data:image/png") == 1


GUARD = {
    "settings": {"n_per_prompt": 4, "note": "<i>seed</i>"}, "memorized": 54, "clean": 330, "images_per_prompt": 4,
    "policies": {
        "off": {"memorized_generation_copy_rate": 1.0, "attribute_agreement_ratio": 1.0,
                "similarity_measure": "same prompt", "memorized_similarity": 1.0},
        "rewrite": {"memorized_generation_copy_rate": 0.028, "attribute_agreement_ratio": 0.836,
                    "similarity_measure": "text (<judge>)", "memorized_similarity": 0.912},
        "<b>$x$</b>": {"memorized_generation_copy_rate": 0.5, "attribute_agreement_ratio": 0.6},
        "block": {"memorized_generation_copy_rate": 0.0, "attribute_agreement_ratio": None},
    },
}


def _guard_rows(page: str) -> list[str]:
    table = page.split("<table class='guard'>", 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr><td>(.*?)</td>", table)


def test_guard_check_section_has_the_plot_one_row_per_policy_and_escapes() -> None:
    page = build_report([], title="guards", guard_checks={"<run>": GUARD})
    assert page.count("data:image/png;base64,") == 1 and "alt='copy rate vs attribute agreement'" in page
    assert _guard_rows(page) == ["off", "rewrite", "&lt;b&gt;$x$&lt;/b&gt;", "block"]
    assert "<td>0.912</td>" in page and "<td>text (&lt;judge&gt;)</td>" in page and "<td>-</td>" in page
    assert "<b>" not in page and "<i>" not in page and "&lt;i&gt;seed&lt;/i&gt;" in page
    assert "54 memorized prompts, 330 clean prompts, 4 images each." in page
    assert "Score distributions" not in page  # no scores files, no empty sections
    both = build_report([_item("anisotropy", 0)], guard_checks={"run": GUARD})
    assert both.count("data:image/png;base64,") == 3 and len(_guard_rows(both)) == 4  # ROC, histogram, trade-off


def test_tradeoff_plot_has_one_labelled_point_per_policy_and_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    monkeypatch.setattr(report, "_png", lambda figure: figures.append(figure) or "data:image/png;base64,")
    faster = {**GUARD, "policies": {"rewrite": {**GUARD["policies"]["rewrite"], "attribute_agreement_ratio": 0.7}}}
    report.tradeoff_png({"a": GUARD, "b": faster})
    warned = {**GUARD, "policies": {**GUARD["policies"], "warn": GUARD["policies"]["off"]}}
    report.tradeoff_png({"a": warned})
    (two, one) = (f.axes[0] for f in figures)
    labels = [t.get_text() for t in two.texts]
    assert labels == ["off (a)", "rewrite (a)", r"<b>\$x\$</b> (a)", "block (a)", "rewrite (b)"]
    points = [tuple(map(float, c.get_offsets()[0])) for c in two.collections]
    assert points == [(1.0, 1.0), (0.028, 0.836), (0.5, 0.6), (0.0, 0.0), (0.028, 0.7)]  # block: no agreement, 0
    assert [t.get_text() for t in one.texts] == ["off, warn", "rewrite", r"<b>\$x\$</b>", "block"]  # one spot
    assert len(one.collections) == 5


def test_report_command_takes_guard_checks_alone_or_with_scores(
    tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    guard = tmp_path / "guard.json"
    guard.write_text(json.dumps(GUARD))
    out = tmp_path / "g.html"
    result = runner.invoke(app, ["report", "--guard-check", str(guard), "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 1 and len(_guard_rows(page)) == 4
    scores = tmp_path / "scores.parquet"
    assert runner.invoke(app, ["detect", str(prompts_csv), "-o", str(scores), "--model", str(tiny_model_dir),
                               "--threshold", "0"]).exit_code == 0
    result = runner.invoke(app, ["report", str(scores), "--guard-check", str(guard), "-o", str(tmp_path / "b.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "b.html").read_text()
    assert "Top 20 prompts: anisotropy" in page and len(_guard_rows(page)) == 4
    assert page.count("data:image/png;base64,") == 2  # histogram (no labels, no ROC) + trade-off


@pytest.mark.parametrize(
    ("content", "code", "words"),
    [
        ("{not json", 2, "is not JSON"),
        ("[1, 2]", 2, "a JSON list, not an object"),
        (json.dumps({"policies": {}}), 2, "no 'policies' object"),
        (json.dumps({"policies": {"warn": {"attribute_agreement_ratio": 1.0}}}), 2,
         "policy 'warn' has no number 'memorized_generation_copy_rate'"),
        (json.dumps({"policies": {"warn": {"memorized_generation_copy_rate": 1, "attribute_agreement_ratio": "x"}}}),
         2, "neither a number nor null"),
        (None, 4, "cannot read guard check"),
    ],
)
def test_report_command_refuses_a_malformed_guard_check_in_one_line(
    content: str | None, code: int, words: str, tmp_path: Path
) -> None:
    guard = tmp_path / "guard.json"
    if content is not None:
        guard.write_text(content)
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", "--guard-check", str(guard), "-o", str(out)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code and len(lines) == 1 and words in lines[0], result.output
    assert "Traceback" not in result.output and not out.exists()


def test_report_command_needs_scores_or_a_guard_check(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "give SCORES files, --guard-check files, or both" in result.stderr


def test_report_command_never_writes_over_a_guard_check(tmp_path: Path) -> None:
    guard = tmp_path / "guard.json"
    guard.write_text(json.dumps(GUARD))
    result = CliRunner().invoke(app, ["report", "--guard-check", str(guard), "-o", str(guard), "--if-exists",
                                      "overwrite"])
    assert result.exit_code == 2 and "input" in result.stderr and json.loads(guard.read_text()) == GUARD


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed")
def test_guard_check_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = write_report([], tmp_path / "guard.html", guard_checks={"run": GUARD})
    pixels = _screenshot(page, tmp_path / "shot.png", height=900)
    assert pixels.shape[:2] == (900, 1200)
    rgb = pixels[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1) > 0.3).mean()  # the plot's four points, ~90 px each
    dark = (rgb.mean(axis=-1) < 0.5).mean()  # axes, labels and the table's text
    assert coloured > 2e-4 and dark > 0.005
