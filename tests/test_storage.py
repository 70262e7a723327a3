"""memscan.storage: prompt files, scores and output checks at fsspec URLs, against a real S3 endpoint
(moto's server mode, s3fs as the client), memory:// and a local HTTP server; no model needed."""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from _s3 import S3, denying_server, s3_bucket  # noqa: E402
from test_readers import ALL_FORMATS, IDS, PROMPTS, write_table  # noqa: E402

from memscan import storage  # noqa: E402
from memscan.cli import app  # noqa: E402
from memscan.errors import EXIT_INPUT, EXIT_USAGE, InputError, OutputError, UsageError  # noqa: E402
from memscan.io.readers import PromptSource  # noqa: E402
from memscan.io.scores import read_scores, scores_schema, to_table, write_scores  # noqa: E402
from memscan.outputs import atomic_write_bytes, check_output, output_kind  # noqa: E402
from memscan.run.plan import expand_inputs  # noqa: E402
from tests.conftest import run_cli_without

runner = CliRunner()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_bucket("storage") as bucket:
        yield bucket


@pytest.fixture
def options(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test (or a CLI --storage-option) sets in MEMSCAN_STORAGE_OPTIONS is undone after it."""
    monkeypatch.setenv(storage.ENV_OPTIONS, os.environ.get(storage.ENV_OPTIONS, ""))


def _memory(name: str, data: bytes) -> str:
    url = f"memory://memscan-tests/{name}"
    storage.RemotePath(url).write_bytes(data)
    return url


# ------------------------------------------------------------------------- options and names


def test_storage_options_are_key_value_with_json_values(options: None) -> None:
    parsed = storage.parse_storage_options([
        "endpoint_url=http://localhost:9000", "anon=true", "max_concurrency=4", "token=null", "secret=a=b",
        'client_kwargs={"region_name": "eu-west-1"}', 's3.profile="7"',
    ])
    assert parsed == {"endpoint_url": "http://localhost:9000", "anon": True, "max_concurrency": 4, "token": None,
                      "secret": "a=b", "client_kwargs": {"region_name": "eu-west-1"}, "s3.profile": "7"}
    with pytest.raises(UsageError, match="KEY=VALUE") as info:
        storage.parse_storage_options(["anon"])
    assert info.value.exit_code == EXIT_USAGE and "\n" not in str(info.value)
    storage.configure({"anon": True, "s3.endpoint_url": "http://x", "gs.project": "p"}, merge=False)
    assert storage.options_for("s3") == storage.options_for("s3a") == {"anon": True, "endpoint_url": "http://x"}
    assert storage.options_for("gcs") == {"anon": True, "project": "p"}
    assert storage.options_for("memory") == {"anon": True}


def test_urls_are_normalised_and_named_like_paths(s3: S3) -> None:
    path = storage.location(f"s3a://{s3.bucket}/audit/")
    assert isinstance(path, storage.RemotePath) and str(path) == f"s3://{s3.bucket}/audit"
    shard = path / "shards" / "part-00001.parquet"
    assert (shard.name, shard.suffix, str(shard.parent)) == ("part-00001.parquet", ".parquet", f"{path}/shards")
    assert storage.RemotePath("https://example.org/data/p.csv.gz?download=1").suffixes == [".csv", ".gz"]
    assert storage.location("file:///tmp/x.csv") == Path("/tmp/x.csv")
    assert storage.location("audit/") == Path("audit") and not storage.is_url("C:/data")
    with pytest.raises(TypeError):
        os.fspath(path)  # local-only code fails loudly, never writes into a folder named "s3:"


# ------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_every_format_reads_the_same_from_a_bucket_and_memory(s3: S3, tmp_path: Path, name: str) -> None:
    columns = {"prompt": PROMPTS} if name.startswith("p.txt") else {"prompt": PROMPTS, "id": IDS}
    local = write_table(tmp_path / name, columns)
    kwargs = {} if name.startswith("p.txt") else {"id_column": "id"}
    want = PromptSource(local, **kwargs).read()
    for url in (s3.put(f"formats/{name}", local.read_bytes()), _memory(f"formats/{name}", local.read_bytes())):
        source = PromptSource(url, **kwargs)
        pd.testing.assert_frame_equal(source.read(), want)
        assert source.count_rows() == len(PROMPTS)
        pd.testing.assert_frame_equal(source.read_range(2, 5), want.iloc[2:5].reset_index(drop=True))


def test_parquet_planning_reads_only_the_footer_from_the_store(s3: S3, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs.core

    rows, groups = 400_000, 8
    local = tmp_path / "big.parquet"
    texts = [f"caption {i} of a set that grows nightly, variant {i * 7919 % 100_003}" for i in range(rows)]
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(rows)], "caption": texts}), local,
                   row_group_size=rows // groups)
    size = local.stat().st_size
    url = s3.put("big/big.parquet", local.read_bytes())
    fetched: list[int] = []
    original = s3fs.core.S3File._fetch_range

    def counting(self: s3fs.core.S3File, start: int, end: int) -> bytes:
        data = original(self, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    source = PromptSource(url, id_column="key")  # checks the columns: schema from the footer
    assert source.count_rows() == rows
    planning = sum(fetched)
    print(f"planning read {planning} of {size} bytes ({planning / size:.2%})")
    assert planning < 0.02 * size, (planning, size)
    assert len(fetched) == 1  # one range request: the footer, read once for the columns and the count
    fetched.clear()
    frame = source.read_range(rows // 2, rows // 2 + 10)  # inside one row group: only its pages
    assert frame["prompt"].tolist() == texts[rows // 2: rows // 2 + 10]
    assert frame["prompt_id"].tolist() == [f"k{i}" for i in range(rows // 2, rows // 2 + 10)]
    assert planning < sum(fetched) < 2 * size / groups, (sum(fetched), size)


def test_prefixes_and_globs_on_a_bucket_list_like_folders(s3: S3) -> None:
    for key in ("in/b.txt", "in/a.csv", "in/c.parquet.bak", "in/sub/d.csv"):
        s3.put(key, b"prompt\nx\n")
    names = [p.name for p in expand_inputs(s3.url("in/"))]
    assert names == ["a.csv", "b.txt"]  # files of the prefix itself, sorted; not sub/, not .bak
    assert [p.name for p in expand_inputs(s3.url("in"))] == names
    assert [str(p) for p in expand_inputs(s3.url("in/*.csv"))] == [s3.url("in/a.csv")]
    with pytest.raises(InputError, match="no file matches"):
        expand_inputs(s3.url("in/*.tsv"))
    with pytest.raises(InputError, match="holds no prompt files"):
        expand_inputs(s3.url("in/sub/nothing/"))


def test_https_input_is_read_like_a_file(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    local = write_table(tmp_path / "p.csv", {"prompt": PROMPTS, "id": IDS})
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/p.csv"
        pd.testing.assert_frame_equal(PromptSource(url, id_column="id").read(),
                                      PromptSource(local, id_column="id").read())
    finally:
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


# ------------------------------------------------------------------------- outputs


def test_scores_are_written_whole_and_read_back_from_a_bucket_and_memory(s3: S3) -> None:
    frame = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["x", None], "score": [1.5, None],
                          "flagged": [True, None], "truncated": [False, False], "status": ["ok", "skipped_empty"],
                          "error": [None, None]})
    table = to_table(frame, scores_schema(["score"]), {"model": "tiny"})
    for url in (s3.url("scores/s.parquet"), "memory://memscan-tests/scores/s.parquet"):
        write_scores(table, url)
        got, facts = read_scores(url)
        assert facts == {"model": "tiny"} and got["prompt_id"].tolist() == ["a", "b"]
        assert got["score"].iloc[0] == 1.5
    assert s3.keys("scores/") == ["scores/s.parquet"]  # one object, no temporary beside it
    atomic_write_bytes(s3.url("scores/labels.csv"), lambda tmp: tmp.write_text("a,b\n"))
    assert s3.get("scores/labels.csv") == b"a,b\n"


def test_output_checks_on_a_bucket_probe_and_leave_nothing(s3: S3) -> None:
    assert output_kind(s3.url("out/scores.parquet")) == "file"
    assert output_kind(s3.url("out/audit")) == output_kind(s3.url("out/audit.v2/")) == "run"
    with pytest.raises(UsageError, match=r"\.parquet"):
        output_kind(s3.url("out/scores.csv"))
    assert check_output(s3.url("out/audit/"), kind="run", if_exists="resume") == storage.location(s3.url("out/audit"))
    assert check_output(s3.url("out/new.parquet")) == storage.location(s3.url("out/new.parquet"))
    assert s3.keys("out/") == []  # the probe object was deleted
    existing = s3.put("out/old.parquet", b"keep")
    with pytest.raises(UsageError, match="--if-exists overwrite"):
        check_output(existing)
    with pytest.raises(UsageError, match="is also an input"):
        check_output(s3.url("out/old.parquet"), inputs=[f"s3a://{s3.bucket}/out/old.parquet"], if_exists="overwrite")
    with pytest.raises(UsageError, match="not a directory"):
        check_output(existing, kind="run", if_exists="resume")
    with pytest.raises(OutputError) as info:
        check_output("s3://no-such-bucket-memscan/audit/", kind="run", if_exists="resume", what="run directory")
    message = str(info.value)
    assert info.value.exit_code == EXIT_INPUT and "\n" not in message
    assert message.startswith("cannot write run directory s3://no-such-bucket-memscan/audit: not found")


def test_conditional_create_writes_once(s3: S3) -> None:
    for base in (s3.url("claims"), "memory://memscan-tests/claims"):
        target = storage.location(base) / "manifest.json"
        assert storage.create_exclusive(target, b"first") is True
        assert storage.create_exclusive(target, b"second") is False
        assert target.read_bytes() == b"first"


# ------------------------------------------------------------------------- one line, exit 4 (or 2)


def _one_line(result: object, code: int) -> str:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.exit_code == code, result.output  # type: ignore[attr-defined]
    assert stderr.startswith("memscan: error:") and len(stderr.strip().splitlines()) == 1, stderr
    return stderr


def test_unreachable_missing_and_denied_stores_are_one_line_exit_4(s3: S3, tmp_path: Path, options: None) -> None:
    local = write_table(tmp_path / "p.csv", {"prompt": PROMPTS})
    url = s3.put("bad/p.csv", local.read_bytes())
    out = str(tmp_path / "out.parquet")
    unreachable = ["--storage-option", "s3.endpoint_url=http://127.0.0.1:1"]
    line = _one_line(runner.invoke(app, ["detect", url, "-o", out, *unreachable]), EXIT_INPUT)
    assert "cannot reach the store" in line and url in line
    storage.configure({"s3.endpoint_url": s3.endpoint})
    line = _one_line(runner.invoke(app, ["detect", "s3://no-such-bucket-memscan/p.csv", "-o", out]), EXIT_INPUT)
    assert "s3://no-such-bucket-memscan/p.csv: no such file" in line
    line = _one_line(runner.invoke(app, ["detect", str(local), "-o", "s3://no-such-bucket-memscan/s.parquet"]),
                     EXIT_INPUT)
    assert "cannot write output s3://no-such-bucket-memscan/s.parquet: not found" in line
    line = _one_line(runner.invoke(app, ["merge", s3.url("no-run/"), "-o", out]), EXIT_USAGE)
    assert "not a memscan run directory" in line
    with denying_server() as endpoint:
        denied = ["--storage-option", f"s3.endpoint_url={endpoint}"]
        line = _one_line(runner.invoke(app, ["detect", url, "-o", out, *denied]), EXIT_INPUT)
        assert "permission denied" in line
        line = _one_line(runner.invoke(app, ["detect", str(local), "-o", s3.url("denied/"), *denied]), EXIT_INPUT)
        assert "permission denied" in line and "run directory" in line
    assert not Path(out).exists()


def test_a_missing_filesystem_package_names_its_extra(tmp_path: Path) -> None:
    result = run_cli_without("s3fs", "detect", "s3://bucket/p.csv", "-o", str(tmp_path / "o.parquet"))
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.strip().splitlines() == [
        "memscan: error: s3://bucket/p.csv: s3:// needs the s3fs package: pip install 'memscan[s3]'"
    ]
    for protocol, extra in (("gs", "gcs"), ("az", "azure")):
        package = storage.EXTRAS[protocol][0]
        try:
            __import__(package)
            continue  # installed here: nothing missing to report
        except ImportError:
            pass
        line = _one_line(runner.invoke(app, ["status", f"{protocol}://bucket/audit/"]), EXIT_USAGE)
        assert f"pip install 'memscan[{extra}]'" in line


def test_storage_option_reaches_the_filesystem(s3: S3, tmp_path: Path, options: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(storage.ENV_OPTIONS)
    local = write_table(tmp_path / "p.csv", {"prompt": PROMPTS})
    url = s3.put("opt/p.csv", local.read_bytes())
    result = runner.invoke(app, ["diff", url, url, "--storage-option", f"s3.endpoint_url={s3.endpoint}"])
    line = _one_line(result, EXIT_INPUT)  # read through the endpoint: not a scores file, said in one line
    assert "not a memscan detect output" in line or "cannot read scores file" in line
    assert json.loads(os.environ[storage.ENV_OPTIONS]) == {"s3.endpoint_url": s3.endpoint}
