"""`memscan diff` and `detect --previous`: what changed between two audits, matched by prompt_id."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from memscan.cli import app
from memscan.config import DetectSettings
from memscan.diff import CATEGORIES, ENTRY_COLUMNS, diff_scores, load_scores
from memscan.errors import InputError
from memscan.io.scores import scores_schema, to_table, write_scores
from memscan.run import RunOptions, run_detect

runner = CliRunner()

FACTS = {"model": "tiny", "source": "tiny", "method": "anisotropy", "w_norm": 1.0, "w_align": 2.0, "seed": 51,
         "n_noise": 1, "dtype": "float32", "threshold": 0.5, "memscan_version": "0.1", "fingerprint": "f1"}


def _write(path: Path, rows: list[tuple], facts: dict | None = None, *, store_prompt: bool = True) -> Path:
    """A scores file from (prompt_id, score, flagged, status) rows, in the schema detect writes."""
    frame = pd.DataFrame({
        "prompt_id": [r[0] for r in rows],
        "prompt": [f"prompt {r[0]}" for r in rows],
        "norm": [r[1] for r in rows], "alignment": [0.0 for _ in rows], "score": [r[1] for r in rows],
        "flagged": pd.array([r[2] for r in rows], dtype="boolean"),
        "truncated": [False for _ in rows],
        "status": [r[3] for r in rows],
        "error": [None if r[3] == "ok" else "boom" for r in rows],
    })
    schema = scores_schema(["norm", "alignment", "score"], store_prompt=store_prompt)
    write_scores(to_table(frame, schema, FACTS if facts is None else facts), path)
    return path


NAN = float("nan")
OLD_ROWS = [
    ("a", 0.9, True, "ok"),          # still flagged
    ("b", 0.2, False, "ok"),         # newly flagged
    ("c", 0.8, True, "ok"),          # no longer flagged
    ("d", 0.7, True, "ok"),          # unscored in NEW: never counted as unflagged
    ("e", 0.1, False, "ok"),         # unscored (empty) in NEW
    ("f", NAN, None, "error"),       # unscored before, flagged now: newly flagged
    ("g", 0.3, False, "ok"),         # unchanged
    ("r1", 0.95, True, "ok"),        # removed (was flagged)
    ("r2", 0.05, False, "ok"),       # removed
]
NEW_ROWS = [
    ("a", 0.91, True, "ok"),
    ("b", 0.6, True, "ok"),
    ("c", 0.4, False, "ok"),
    ("d", NAN, None, "oom"),
    ("e", NAN, None, "skipped_empty"),
    ("f", 0.7, True, "ok"),
    ("g", 0.31, False, "ok"),
    ("n1", 0.99, True, "ok"),        # added and flagged: newly flagged too
    ("n2", 0.2, False, "ok"),        # added
]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return _write(tmp_path / "old.parquet", OLD_ROWS), _write(tmp_path / "new.parquet", NEW_ROWS)


def _ids(frame: pd.DataFrame) -> list[str]:
    return list(frame["prompt_id"])


def test_every_category(pair: tuple[Path, Path]) -> None:
    result = diff_scores(*pair)
    assert _ids(result.frames["newly_flagged"]) == ["n1", "f", "b"]  # highest new score first
    assert _ids(result.frames["no_longer_flagged"]) == ["c"]
    assert _ids(result.frames["still_flagged"]) == ["a"]
    assert _ids(result.frames["added"]) == ["n1", "n2"]
    assert _ids(result.frames["removed"]) == ["r1", "r2"]
    assert _ids(result.frames["unscored"]) == ["d", "e"]  # NEW's order
    assert result.counts == {
        "old_rows": 9, "new_rows": 9, "matched": 7, "newly_flagged": 3, "no_longer_flagged": 1,
        "still_flagged": 1, "added": 2, "removed": 2, "unscored": 2, "prompt_changed": 0,
    }
    assert result.unscored_by_status == {"oom": 1, "skipped_empty": 1}
    d = result.frames["unscored"].iloc[0]
    assert (d["old_flagged"], d["old_status"], d["new_status"]) == (True, "ok", "oom")
    assert result.differences == {} and result.warnings == []
    assert result.line() == ("3 newly flagged, 1 no longer flagged, 1 still flagged, 2 added, 2 removed, "
                             "2 unscored (9 -> 9 rows)")


def test_same_input_twice_has_no_news(pair: tuple[Path, Path]) -> None:
    result = diff_scores(pair[1], pair[1])
    assert result.counts["newly_flagged"] == 0 and result.counts["still_flagged"] == 4
    assert result.counts["unscored"] == 2 and result.counts["added"] == result.counts["removed"] == 0


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    dup = _write(tmp_path / "dup.parquet", [("a", 0.1, False, "ok"), ("a", 0.2, False, "ok"), ("b", 0.3, False, "ok")])
    good = _write(tmp_path / "good.parquet", [("a", 0.1, False, "ok")])
    with pytest.raises(InputError, match=r"prompt_id is not unique \(1 ids occur more than once, e.g. 'a'\)"):
        diff_scores(good, dup)
    result = runner.invoke(app, ["diff", str(dup), str(good)])
    assert result.exit_code == 4
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not unique" in lines[0] and "Traceback" not in result.output


def test_different_threshold_and_model_warn_and_strict_refuses(tmp_path: Path) -> None:
    old = _write(tmp_path / "old.parquet", OLD_ROWS)
    new = _write(tmp_path / "new.parquet", NEW_ROWS,
                 {**FACTS, "threshold": 0.7, "model": "sd-v1-4", "memscan_version": "0.2", "fingerprint": "f2"})
    result = diff_scores(old, new)
    assert result.differences == {"model": ("tiny", "sd-v1-4"), "threshold": (0.5, 0.7)}  # not version, fingerprint
    assert len(result.warnings) == 1
    assert "model: 'tiny' -> 'sd-v1-4'; threshold: 0.5 -> 0.7" in result.warnings[0]
    cli = runner.invoke(app, ["diff", str(old), str(new)])
    assert cli.exit_code == 0, cli.output
    warning = [line for line in cli.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "threshold: 0.5 -> 0.7" in warning[0]
    strict = runner.invoke(app, ["diff", str(old), str(new), "--strict"])
    assert strict.exit_code == 2
    assert strict.stderr.strip().splitlines() == [
        f"memscan: error: {old} and {new} were scored differently (model, threshold); "
        "drop --strict to compare them anyway"
    ]
    same = runner.invoke(app, ["diff", str(old), str(old), "--strict"])
    assert same.exit_code == 0 and "warning" not in same.stderr


def test_no_common_id_and_changed_prompt_warn(tmp_path: Path) -> None:
    old = _write(tmp_path / "old.parquet", [("x:0", 0.1, False, "ok")])
    new = _write(tmp_path / "new.parquet", [("y:0", 0.1, False, "ok")])
    assert any("no prompt_id is in both" in w for w in diff_scores(old, new).warnings)
    table = pq.read_table(old)
    other = tmp_path / "other.parquet"
    pq.write_table(table.set_column(1, "prompt", pa.array(["something else"])), other)
    result = diff_scores(old, other)
    assert result.counts["prompt_changed"] == 1
    assert any("1 prompt_ids hold a different prompt" in w for w in result.warnings)


def test_json_shape(pair: tuple[Path, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["diff", str(pair[0]), str(pair[1]), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data) == ["old", "new", "counts", "unscored_by_status", "differences", "warnings", "limit",
                          *CATEGORIES]
    assert data["old"] == {"source": str(pair[0]), "rows": 9, "model": "tiny", "method": "anisotropy",
                           "threshold": 0.5, "fingerprint": "f1"}
    assert data["counts"]["newly_flagged"] == 3 and data["limit"] is None
    for name in CATEGORIES:
        for entry in data[name]:
            assert list(entry) == list(ENTRY_COLUMNS)
    assert data["newly_flagged"][2] == {
        "prompt_id": "b", "prompt": "prompt b", "old_score": pytest.approx(0.2), "new_score": pytest.approx(0.6),
        "old_flagged": False, "new_flagged": True, "old_status": "ok", "new_status": "ok",
    }
    added = data["added"][0]
    assert added["prompt_id"] == "n1" and added["old_score"] is None and added["old_status"] is None
    assert data["unscored"][1] == {
        "prompt_id": "e", "prompt": "prompt e", "old_score": pytest.approx(0.1), "new_score": None,
        "old_flagged": False, "new_flagged": None, "old_status": "ok", "new_status": "skipped_empty",
    }
    limited = json.loads(runner.invoke(app, ["diff", str(pair[0]), str(pair[1]), "--json", "--limit", "1"]).stdout)
    assert limited["limit"] == 1 and _ids(pd.DataFrame(limited["newly_flagged"])) == ["n1"]
    assert limited["counts"]["newly_flagged"] == 3
    # without stored prompts the key stays, null
    bare = _write(tmp_path / "bare.parquet", NEW_ROWS, store_prompt=False)
    data = json.loads(runner.invoke(app, ["diff", str(bare), str(bare), "--json"]).stdout)
    assert data["still_flagged"][0]["prompt"] is None


def test_human_output_is_a_table_and_one_line(pair: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["diff", str(pair[0]), str(pair[1])])
    assert result.exit_code == 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (f"memscan: {pair[0]} -> {pair[1]}: 3 newly flagged, 1 no longer flagged, 1 still flagged, "
                         "2 added, 2 removed, 2 unscored (9 -> 9 rows)")
    assert "newly flagged" in result.stderr and "n1" in result.stderr and "oom" in result.stderr
    new_flag = runner.invoke(app, ["diff", str(pair[0]), str(pair[1]), "--fail-on-new-flagged"])
    assert new_flag.exit_code == 10
    assert runner.invoke(app, ["diff", str(pair[1]), str(pair[1]), "--fail-on-new-flagged"]).exit_code == 0


def test_bad_inputs_one_line_exit_4(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.parquet", [("a", 0.1, False, "ok")])
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pq.read_table(good).select(["prompt_id", "prompt"]), prompts)
    for other, needle in ((tmp_path / "missing.parquet", "no such scores file or run directory"),
                          (tmp_path, "not a scores file or a memscan run directory"),
                          (prompts, "no column score, flagged, status")):
        result = runner.invoke(app, ["diff", str(good), str(other)])
        assert result.exit_code == 4, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines


# --------------------------------------------------------------------------- run directories


def test_run_directory_is_read_through_its_shards(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = DetectSettings(model=str(tiny_model_dir), device="cpu", id_column="id", threshold=0.0)
    assert run_detect(prompts_csv, run, settings, RunOptions(shard_size=2), interactive=False).exit_code == 0
    files = sorted(p.relative_to(run) for p in run.rglob("*"))
    loaded = load_scores(run)
    assert list(loaded.frame["prompt_id"]) == ["a", "b", "c", "d", "e"] and loaded.facts["threshold"] == 0.0
    runner.invoke(app, ["merge", str(run), "-o", str(tmp_path / "merged.parquet")])
    result = diff_scores(run, tmp_path / "merged.parquet")
    assert result.counts["matched"] == 5 and result.counts["still_flagged"] == 4 and result.counts["unscored"] == 1
    assert result.counts["newly_flagged"] == result.counts["added"] == result.counts["removed"] == 0
    assert result.differences == {}
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == files  # nothing written into the run
    # an unfinished run is refused, not read as rows removed
    next(iter((run / "stats").glob("part-*.json"))).unlink()
    cli = runner.invoke(app, ["diff", str(run), str(tmp_path / "merged.parquet")])
    assert cli.exit_code == 4
    assert "1 of 3 shards are not done" in cli.stderr and len(cli.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- detect --previous

ALL_PROMPTS = {
    "a": "a photo of a cat", "b": "a red square on a blue background", "c": "",
    "d": "the mona lisa by leonardo da vinci", "e": "a dog running on the beach",
    "f": "an oil painting of a ship in a storm", "g": "a portrait of a woman with a pearl earring",
}


@pytest.fixture(scope="module")
def nightly(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float, str]:
    """Yesterday's prompts, today's (one more: the highest-scoring prompt), and a threshold flagging
    today's top three; the probe scores all of them once to place the threshold between scores."""
    from memscan.detect import detect

    folder = tmp_path_factory.mktemp("nightly")
    today = folder / "today.csv"
    pd.DataFrame({"id": list(ALL_PROMPTS), "prompt": list(ALL_PROMPTS.values())}).to_csv(today, index=False)
    probe = detect(today, None, DetectSettings(model=str(tiny_model_dir), device="cpu", id_column="id")).scores
    ranked = probe[probe["status"] == "ok"].sort_values("score", ascending=False)
    scores = list(ranked["score"])
    assert scores[2] - scores[3] > 1e-3  # room for batch-to-batch rounding on either side
    threshold = float(scores[2] + scores[3]) / 2
    top = str(ranked["prompt_id"].iloc[0])
    yesterday = folder / "yesterday.csv"
    pd.DataFrame({"id": [k for k in ALL_PROMPTS if k != top],
                  "prompt": [v for k, v in ALL_PROMPTS.items() if k != top]}).to_csv(yesterday, index=False)
    return yesterday, today, threshold, top


def _run(model: Path, *args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["detect", *map(str, args), "--model", str(model), "--device", "cpu",
                               "--id-column", "id"])


def test_detect_previous_single_file(nightly: tuple[Path, Path, float, str], tiny_model_dir: Path,
                                     tmp_path: Path) -> None:
    yesterday, today, threshold, top = nightly
    t = ("--threshold", threshold)
    first = _run(tiny_model_dir, yesterday, "-o", tmp_path / "1.parquet", *t, "--fail-on-new-flagged",
                 "--previous", tmp_path / "none.parquet")
    assert first.exit_code == 4 and not (tmp_path / "1.parquet").exists()  # refused before scoring
    assert "none.parquet: no such scores file or run directory" in first.stderr
    assert _run(tiny_model_dir, yesterday, "-o", tmp_path / "1.parquet", *t).exit_code == 0
    second = _run(tiny_model_dir, today, "-o", tmp_path / "2.parquet", *t, "--previous", tmp_path / "1.parquet",
                  "--fail-on-new-flagged", "--json")
    assert second.exit_code == 10, second.output
    changes = json.loads(second.stdout)["changes"]
    assert changes["previous"] == str(tmp_path / "1.parquet")
    assert {k: changes[k] for k in ("newly_flagged", "no_longer_flagged", "still_flagged", "added", "removed",
                                    "unscored")} == {"newly_flagged": 1, "no_longer_flagged": 0, "still_flagged": 2,
                                                     "added": 1, "removed": 0, "unscored": 1}
    assert changes["unscored_by_status"] == {"skipped_empty": 1} and changes["differences"] == {}
    closing = second.stderr.strip().splitlines()
    assert any(line.endswith(f"since {tmp_path / '1.parquet'}: 1 newly flagged, 0 no longer flagged, 2 still flagged, "
                             "1 added, 0 removed, 1 unscored (6 -> 7 rows)") for line in closing), closing
    # tomorrow's rerun of the same input, the output its own previous (the README's crontab line):
    # the same three prompts are flagged, nothing new
    third = _run(tiny_model_dir, today, "-o", tmp_path / "2.parquet", "--if-exists", "overwrite", *t,
                 "--previous", tmp_path / "2.parquet", "--fail-on-new-flagged", "--json")
    assert third.exit_code == 0, third.output
    assert json.loads(third.stdout)["flagged"] == 3 and json.loads(third.stdout)["changes"]["newly_flagged"] == 0
    assert json.loads(third.stdout)["changes"]["still_flagged"] == 3
    # --fail-on-flagged keeps its meaning: any flag
    assert _run(tiny_model_dir, today, "-o", tmp_path / "4.parquet", *t, "--previous", tmp_path / "2.parquet",
                "--fail-on-flagged").exit_code == 10


def test_detect_previous_run_directory(nightly: tuple[Path, Path, float, str], tiny_model_dir: Path,
                                       tmp_path: Path) -> None:
    yesterday, today, threshold, top = nightly
    t = ("--threshold", threshold, "--shard-size", 3)
    assert _run(tiny_model_dir, yesterday, "-o", tmp_path / "1.parquet", "--threshold", threshold).exit_code == 0
    second = _run(tiny_model_dir, today, "-o", tmp_path / "run2", *t, "--previous", tmp_path / "1.parquet",
                  "--fail-on-new-flagged", "--json")
    assert second.exit_code == 10, second.output
    changes = json.loads(second.stdout)["changes"]
    assert (changes["newly_flagged"], changes["added"], changes["still_flagged"]) == (1, 1, 2)
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["changes"]["newly_flagged"] == 1
    assert any(line.endswith(f"since {tmp_path / '1.parquet'}: 1 newly flagged, 0 no longer flagged, 2 still flagged, "
                             "1 added, 0 removed, 1 unscored (6 -> 7 rows)") for line in second.stderr.splitlines())
    (tmp_path / "latest").symlink_to(tmp_path / "run2")  # the README's crontab moves a `latest` link
    third = _run(tiny_model_dir, today, "-o", tmp_path / "run3", *t, "--previous", tmp_path / "latest",
                 "--fail-on-new-flagged")
    assert third.exit_code == 0, third.output
    assert json.loads((tmp_path / "run3" / "summary.json").read_text())["changes"]["still_flagged"] == 3
    # the run being written is not its own previous
    same = _run(tiny_model_dir, today, "-o", tmp_path / "run3", *t, "--previous", tmp_path / "run3")
    assert same.exit_code == 2 and "--previous" in same.stderr and len(same.stderr.strip().splitlines()) == 1


def test_detect_previous_bad_usage(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.csv"
    prompts.write_text("id,prompt\nx,a cat\ny,a dog\n", encoding="utf-8")
    previous = _write(tmp_path / "old.parquet", [("x", 0.1, False, "ok"), ("x", 0.2, False, "ok")])
    for out in (tmp_path / "s.parquet", tmp_path / "run"):
        alone = _run(tiny_model_dir, prompts, "-o", out, "--fail-on-new-flagged")
        assert alone.exit_code == 2 and "--fail-on-new-flagged needs --previous" in alone.stderr
        dup = _run(tiny_model_dir, prompts, "-o", out, "--previous", previous)  # refused before any scoring
        assert dup.exit_code == 4 and "old.parquet: prompt_id is not unique" in dup.stderr
        assert len(dup.stderr.strip().splitlines()) == 1 and not out.exists()
