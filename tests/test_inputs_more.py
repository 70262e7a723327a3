"""More inputs (issue 13, item 5): WebDataset-style tar shards and Hugging Face `datasets` datasets,
read as prompt files (streamed, never extracted); and every command reading and writing URLs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from memscan import storage
from memscan.cli import app
from memscan.errors import EXIT_INPUT, EXIT_USAGE, InputError, UsageError
from memscan.io.readers import PromptSource, read_prompts
from tests.conftest import run_cli_without

runner = CliRunner()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], *, gz: bool = False) -> Path:
    """A WebDataset tar: each sample's members KEY.EXT, in order."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _json(**record: object) -> bytes:
    return json.dumps(record).encode()


JPEG = b"\xff\xd8\xff" + bytes(range(256)) * 40  # an image member: skipped, never decoded


def _samples(first: int, n: int) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"{i:06d}", {"jpg": JPEG, "txt": f"caption {i}\n".encode(),
                          "json": _json(caption=f"json {i}", url=f"u{i}")}) for i in range(first, first + n)]


# ------------------------------------------------------------------------- WebDataset tar shards


def test_tar_shard_captions_come_from_txt_members_ids_are_shard_and_key(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "captions-000.tar", [
        *_samples(0, 2),
        ("000002", {"jpg": JPEG, "json": _json(caption="only json", url="u2")}),  # no .txt: the JSON caption
        ("000003", {"jpg": JPEG}),  # no caption at all: an empty row
        ("sub/000004", {"txt": "日本語 🙂\r\n".encode()}),
    ])
    source = PromptSource(shard)
    assert source.fmt == "tar" and source.columns == ["caption", "url"]
    frame = source.read()
    assert frame["prompt"].tolist() == ["caption 0", "caption 1", "only json", None, "日本語 🙂"]
    assert frame["prompt_id"].tolist() == ["captions-000.tar:000000", "captions-000.tar:000001",
                                           "captions-000.tar:000002", "captions-000.tar:000003",
                                           "captions-000.tar:sub/000004"]
    assert frame["row_index"].tolist() == [0, 1, 2, 3, 4]
    assert source.count_rows() == 5
    pd.testing.assert_frame_equal(source.read_range(1, 3), frame.iloc[1:3].reset_index(drop=True))
    # --prompt-column picks the JSON key (over the .txt member); keep and id columns are JSON keys too
    full = write_shard(tmp_path / "captions-001.tar",
                       [*_samples(0, 2), ("000002", {"json": _json(caption="only json", url="u2")})])
    chosen = PromptSource(full, prompt_column="caption", id_column="url", keep_columns=["url"]).read_range(0, 3)
    assert chosen["prompt"].tolist() == ["json 0", "json 1", "only json"]
    assert chosen["prompt_id"].tolist() == ["u0", "u1", "u2"] and chosen["url"].tolist() == ["u0", "u1", "u2"]


def test_tar_shard_gzip_and_prompt_key_in_json(tmp_path: Path) -> None:
    samples = [(f"k{i}", {"png": JPEG, "json": _json(prompt=f"p{i}")}) for i in range(3)]
    shard = write_shard(tmp_path / "s.tar.gz", samples, gz=True)
    frame = read_prompts(shard)
    assert frame["prompt"].tolist() == ["p0", "p1", "p2"] and frame["prompt_id"].tolist()[0] == "s.tar.gz:k0"


def test_tar_shard_errors_are_one_line(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "a.tar", [("k0", {"jpg": JPEG, "json": _json(url="x")})])
    with pytest.raises(InputError, match=r"a.tar: no caption: no \.txt member and no prompt, caption or text key"):
        PromptSource(shard)
    with pytest.raises(InputError, match="prompt column 'nope' not found; available: url"):
        PromptSource(shard, prompt_column="nope")
    bad = write_shard(tmp_path / "b.tar", [("k0", {"txt": b"\xff\xfe bad"})])
    with pytest.raises(InputError, match=r"b.tar: member k0.txt: not valid UTF-8 text"):
        PromptSource(bad).read()
    broken = write_shard(tmp_path / "c.tar", [("k0", {"json": b"{nope"})])
    with pytest.raises(InputError, match=r"c.tar: member k0.json: malformed JSON"):
        PromptSource(broken)
    dup = write_shard(tmp_path / "d.tar", [("k0", {"txt": b"a"}), ("k1", {"txt": b"b"}), ("k0", {"jpg": JPEG})])
    with pytest.raises(InputError, match=r"duplicate id 'd.tar:k0' \(sample key\)"):
        PromptSource(dup).read()
    (tmp_path / "e.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InputError, match="e.tar: corrupt or unreadable tar"):
        PromptSource(tmp_path / "e.tar")


def test_tar_members_are_streamed_not_extracted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the caption members are read out of the stream: an image's bytes are never handed out."""
    shard = write_shard(tmp_path / "big.tar", _samples(0, 50))
    opened: list[str] = []
    original = tarfile.TarFile.extractfile

    def spying(self: tarfile.TarFile, member: tarfile.TarInfo | str):  # type: ignore[no-untyped-def]
        opened.append(member.name if isinstance(member, tarfile.TarInfo) else member)
        return original(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spying)
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: pytest.fail("extracted to disk"))
    assert len(PromptSource(shard).read()) == 50
    assert opened and not [name for name in opened if not name.endswith((".txt", ".json"))]


def test_tar_shards_with_brace_ranges_and_globs_plan_a_run_directory(tmp_path: Path, tiny_model_dir: Path) -> None:
    from memscan.run.plan import expand_inputs

    folder = tmp_path / "shards"
    folder.mkdir()
    for n in range(3):
        write_shard(folder / f"captions-{n:03d}.tar", _samples(10 * n, 4))
    names = [p.name for p in expand_inputs(str(folder / "captions-{000..001}.tar"))]
    assert names == ["captions-000.tar", "captions-001.tar"]
    assert [p.name for p in expand_inputs(str(folder / "captions-{000,002}.tar"))] == ["captions-000.tar",
                                                                                      "captions-002.tar"]
    assert len(expand_inputs(str(folder / "*.tar"))) == len(expand_inputs(str(folder))) == 3
    with pytest.raises(InputError, match="no file matches"):
        expand_inputs(str(folder / "captions-{007..009}.tar"))
    out = tmp_path / "audit"
    result = runner.invoke(app, ["detect", str(folder / "captions-{000..002}.tar"), "-o", str(out), "--model",
                                 str(tiny_model_dir), "--shard-size", "5", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["rows"] for i in manifest["inputs"]] == [4, 4, 4] and all(i["staged"] for i in manifest["inputs"])
    merged = tmp_path / "all.parquet"
    assert runner.invoke(app, ["merge", str(out), "-o", str(merged)]).exit_code == 0
    scores = pd.read_parquet(merged)
    assert scores["prompt_id"].tolist()[:2] == ["captions-000.tar:000000", "captions-000.tar:000001"]
    assert scores["prompt"].tolist()[-1] == "caption 23" and (scores["status"] == "ok").all()


# ------------------------------------------------------------------------- Hugging Face datasets


def test_a_dataset_without_the_datasets_package_names_its_extra(tmp_path: Path) -> None:
    result = run_cli_without("datasets", "detect", "hf-dataset:user/captions", "-o", str(tmp_path / "o.parquet"))
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.strip().splitlines() == [
        "memscan: error: hf-dataset:user/captions: reading a Hugging Face dataset needs the datasets package: "
        "pip install 'memscan[datasets]'"
    ]


def _saved_dataset(folder: Path, splits: dict[str, list[str]]) -> Path:
    datasets = pytest.importorskip("datasets")
    built = {name: datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))})
             for name, rows in splits.items()}
    datasets.DatasetDict(built).save_to_disk(str(folder))
    return folder


def test_a_saved_dataset_folder_reads_by_split_and_column(tmp_path: Path) -> None:
    folder = _saved_dataset(tmp_path / "saved", {"train": ["a cat", "a dog", None], "test": ["a bird"]})
    source = PromptSource(f"hf-dataset:{folder}")
    assert source.fmt == "dataset" and source.columns == ["text", "n"] and source.prompt_column == "text"
    frame = source.read()
    assert frame["prompt"].tolist() == ["a cat", "a dog", None]
    assert frame["prompt_id"].tolist() == ["saved:0", "saved:1", "saved:2"]
    test = PromptSource(f"hf-dataset:{folder}#test", id_column="n").read()
    assert test["prompt"].tolist() == ["a bird"] and test["prompt_id"].tolist() == ["0"]
    with pytest.raises(InputError, match=r"split 'valid' not found; available: train, test"):
        PromptSource(f"hf-dataset:{folder}#valid")
    with pytest.raises(InputError, match=r"prompt column 'caption' not found; available: text, n"):
        PromptSource(f"hf-dataset:{folder}", prompt_column="caption")
    with pytest.raises(InputError, match=r"prompt 'n' is a int, not a string"):
        PromptSource(f"hf-dataset:{folder}", prompt_column="n").read()


def test_a_dataset_folder_of_data_files_is_streamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    pd.DataFrame({"caption": [f"c{i}" for i in range(7)]}).to_parquet(folder / "data" / "train-0.parquet")
    calls: list[dict[str, object]] = []
    original = datasets.load_dataset

    def spying(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spying)
    source = PromptSource(f"hf-dataset:{folder}")
    assert source.count_rows() == 7 and source.read_range(2, 4)["prompt"].tolist() == ["c2", "c3"]
    assert calls and all(call.get("streaming") is True and call.get("split") == "train" for call in calls)


def test_an_unreachable_hub_dataset_is_one_line_exit_4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variables once, at import (diffusers imported them long before this
    # test): without these, the load retries the unreachable hub for ~20 s instead of failing at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = runner.invoke(app, ["detect", "hf-dataset:memscan-no-such-org/no-such-captions:en#train", "-o",
                                 str(tmp_path / "o.parquet")])
    assert result.exit_code == EXIT_INPUT, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith("memscan: error: hf-dataset:memscan-no-such-org/no-such-captions:en#train: cannot load "
                           "the dataset"), line


def test_a_dataset_input_runs_detect_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = _saved_dataset(tmp_path / "caps", {"train": ["a photo of a cat", "a red square", "the mona lisa"]})
    out = tmp_path / "s.parquet"
    result = runner.invoke(app, ["detect", f"hf-dataset:{folder}", "-o", str(out), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(out)
    assert scores["prompt_id"].tolist() == ["caps:0", "caps:1", "caps:2"] and (scores["status"] == "ok").all()
    run = tmp_path / "run"
    result = runner.invoke(app, ["detect", f"hf-dataset:{folder}", "-o", str(run), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    merged = tmp_path / "m.parquet"
    assert runner.invoke(app, ["merge", str(run), "-o", str(merged)]).exit_code == 0
    pd.testing.assert_series_equal(pd.read_parquet(merged)["score"], scores["score"])
    again = runner.invoke(app, ["detect", f"hf-dataset:{folder}", "-o", str(run), "--model", str(tiny_model_dir)])
    assert again.exit_code == 0, again.output  # resumed: the same input, nothing left to do


def test_dataset_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="hf-dataset:: names no dataset"):
        PromptSource("hf-dataset:")
    assert storage  # the spec is not a URL: never handed to fsspec
    assert not storage.is_url("hf-dataset:user/captions")


# ------------------------------------------------------------------------- every command on a bucket


def _labelled(n_clean: int = 12) -> bytes:
    clean = [f"a {c} square on a plain background number {i}" for i, c in enumerate(["red", "blue", "green"] * 4)]
    memorized = [f"the {w} harbour of lindale" for w in ("quiet", "golden", "hidden", "silver")]
    rows = [(p, "not_memorized") for p in clean[:n_clean]] + [(p, "memorized") for p in memorized]
    return pd.DataFrame(rows, columns=["prompt", "label"]).to_csv(index=False).encode()


def test_mitigate_evaluate_report_calibrate_read_and_write_a_bucket(tmp_path: Path, tiny_model_dir: Path,
                                                                    prompts_csv: Path) -> None:
    """Every command that reads or writes files takes URLs: mitigate s3 -> s3, evaluate and report
    from s3, calibrate's profile to s3, bench --out-dir, cache info; nothing lands in a folder `s3:`."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from _s3 import s3_bucket

    model = str(tiny_model_dir)
    with s3_bucket("commands") as s3:
        prompts = s3.put("in/prompts.csv", prompts_csv.read_bytes())
        rewritten = s3.url("out/rewritten.parquet")
        result = runner.invoke(app, ["mitigate", prompts, "--model", model, "--target", "0", "-o", rewritten,
                                     "--id-column", "id", "--max-edits", "1", "--beam-width", "2",
                                     "--verify-noise", "0", "--json"])
        assert result.exit_code == 0, result.output
        rows = pd.read_parquet(io.BytesIO(s3.get("out/rewritten.parquet")))
        assert rows["prompt_id"].tolist() == list("abcde") and json.loads(result.stdout)["rows"] == 5

        labels = s3.put("in/labels.csv", _labelled())
        local_labels = tmp_path / "labels.csv"
        local_labels.write_bytes(_labelled())
        scores = tmp_path / "scores.parquet"
        assert runner.invoke(app, ["detect", str(local_labels), "-o", str(scores), "--model", model]).exit_code == 0
        remote_scores = s3.put("scores/scores.parquet", scores.read_bytes())

        local_eval = runner.invoke(app, ["evaluate", str(scores), "--labels", str(local_labels), "--json"])
        remote_eval = runner.invoke(app, ["evaluate", remote_scores, "--labels", labels, "--json"])
        assert remote_eval.exit_code == 0, remote_eval.output
        strip = [{k: v for k, v in row.items() if k != "scores"} for row in json.loads(local_eval.stdout)]
        assert [{k: v for k, v in row.items() if k != "scores"} for row in json.loads(remote_eval.stdout)] == strip
        assert json.loads(remote_eval.stdout)[0]["scores"] == remote_scores

        result = runner.invoke(app, ["report", remote_scores, "--labels", labels, "-o", s3.url("out/report.html")])
        assert result.exit_code == 0, result.output
        assert s3.get("out/report.html").count(b"data:image/png;base64,") == 2

        result = runner.invoke(app, ["calibrate", remote_scores, "--labels", labels, "-o", s3.url("out/cal.toml"),
                                     "--target-fpr", "0.2", "--json"])
        assert result.exit_code == 0, result.output
        profile = s3.get("out/cal.toml").decode()
        assert "threshold = " in profile and f"source = \"{tiny_model_dir.resolve()}\"" in profile
        again = runner.invoke(app, ["calibrate", remote_scores, "--labels", labels, "-o", s3.url("out/cal.toml")])
        assert again.exit_code == EXIT_USAGE and "--if-exists overwrite" in again.stderr

        missing = runner.invoke(app, ["evaluate", s3.url("nope.parquet"), "--labels", labels])
        assert missing.exit_code == EXIT_INPUT and len(missing.stderr.strip().splitlines()) == 1, missing.output
        assert s3.url("nope.parquet") in missing.stderr
        assert not Path("s3:").exists()


def test_tar_shards_on_a_bucket_by_brace_range(tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from _s3 import s3_bucket

    from memscan.run.plan import expand_inputs

    with s3_bucket("shards") as s3:
        for n in range(3):
            local = write_shard(tmp_path / f"captions-{n:03d}.tar", _samples(10 * n, 3))
            s3.put(f"wds/captions-{n:03d}.tar", local.read_bytes())
        found = expand_inputs(s3.url("wds/captions-{000..001}.tar"))
        assert [str(p) for p in found] == [s3.url("wds/captions-000.tar"), s3.url("wds/captions-001.tar")]
        pd.testing.assert_frame_equal(PromptSource(found[1]).read(), PromptSource(tmp_path / "captions-001.tar").read())
        with pytest.raises(InputError, match=r"captions-003.tar: no such file \(1 of the 2 names"):
            expand_inputs(s3.url("wds/captions-{002..003}.tar"))
