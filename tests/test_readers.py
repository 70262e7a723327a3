"""Prompt readers: every format, column detection, ids, streaming and every input error."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memscan.errors import InputError
from memscan.io import OUTPUT_COLUMNS, PromptSource, read_prompts
from memscan.paths import data_dir

PROMPTS = ["a photo of a cat", "NA", "", "  ", 'comma, semicolon; pipe| "quote"', "日本語 🙂"]
IDS = ["p0", "p1", "p2", "p3", "p4", "p5"]
BENCHMARK = data_dir() / "benchmark" / "sd1_mem.txt"  # shipped with memscan (data/benchmark/README.md)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_table(path: Path, columns: dict[str, list], sep: str = ",") -> Path:
    """Write `columns` in the format named by `path`'s extension (gzip if it ends in .gz)."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        pq.write_table(pa.table(columns), path)
        return path
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    if name.endswith(".jsonl"):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    elif name.endswith(".txt"):
        text = "".join(f"{row['prompt']}\n" for row in rows)
    else:
        sep = "\t" if name.endswith(".tsv") else sep
        lines = [sep.join(columns)]
        with_quotes = csv.writer(_Lines(lines), delimiter=sep, lineterminator="")
        for row in rows:
            with_quotes.writerow(row.values())
        text = "\n".join(lines) + "\n"
    return _write(path, text.encode("utf-8"))


class _Lines:
    """A csv.writer target collecting one string per row."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def write(self, text: str) -> None:
        self.lines.append(text)


def assert_input_error(match: str, path: Path, **kwargs) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        read_prompts(path, **kwargs)
    message = str(info.value)
    assert path.name in message and "\n" not in message
    return info.value


PLAIN = ["p.csv", "p.tsv", "p.parquet", "p.jsonl", "p.txt"]
ALL_FORMATS = [*PLAIN, *(f"{name}.gz" for name in PLAIN if not name.endswith(".parquet"))]


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_every_format_reads_the_same_canonical_frame(tmp_path, name):
    path = write_table(tmp_path / name, {"prompt": PROMPTS})
    df = read_prompts(path)
    assert list(df.columns) == list(OUTPUT_COLUMNS)
    assert df["prompt"].tolist() == PROMPTS  # "NA" stays a string, whitespace is kept
    assert df["row_index"].tolist() == list(range(len(PROMPTS))) and df["row_index"].dtype == "int64"
    assert df["prompt_id"].tolist() == [f"{name}:{i}" for i in range(len(PROMPTS))]
    assert PromptSource(path).count_rows() == len(PROMPTS)


@pytest.mark.parametrize("name", ["p.csv", "p.tsv.gz", "p.parquet", "p.jsonl"])
def test_streaming_in_small_batches_equals_read(tmp_path, name):
    path = write_table(tmp_path / name, {"prompt": PROMPTS, "id": IDS, "extra": list("abcdef")})
    source = PromptSource(path, id_column="id", keep_columns=["extra"])
    batches = list(source.iter_batches(rows=4))
    assert [len(b) for b in batches] == [4, 2]
    pd.testing.assert_frame_equal(pd.concat(batches, ignore_index=True), source.read())
    assert source.read()["prompt_id"].tolist() == IDS


@pytest.mark.parametrize(("name", "bad_line"), [("big.csv", b"bad\xff\n"), ("big.txt", b"bad\xff\n")])
def test_text_formats_stream_instead_of_reading_everything(tmp_path, name, bad_line):
    # 3 MB of good rows, then an undecodable one: the first batch arrives before the bad bytes are read.
    head = b"prompt\n" if name.endswith(".csv") else b""
    path = _write(tmp_path / name, head + b"a fine prompt\n" * 200_000 + bad_line)
    batches = PromptSource(path).iter_batches(rows=50_000)
    assert len(next(batches)) == 50_000
    with pytest.raises(InputError, match=r"undecodable byte at byte offset \d+ \(line 20000[12]\)"):
        list(batches)


def test_benchmark_list_is_read_line_for_line():
    """The shipped benchmark list: one prompt a line, as written (line 4 keeps its double quotes)."""
    source = PromptSource(BENCHMARK)
    expected = BENCHMARK.read_text(encoding="utf-8").splitlines()
    df = source.read()
    assert df["prompt"].tolist() == expected and len(df) == source.count_rows() == 500
    assert expected[3].startswith('"Watch: Passion Pit')


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_csv_delimiter_is_sniffed(tmp_path, sep):
    prompts = ["one, two; three", "four | five", "six\tseven"]
    path = write_table(tmp_path / "p.csv", {"id": ["a", "b", "c"], "prompt": prompts}, sep=sep)
    assert read_prompts(path, id_column="id")["prompt"].tolist() == prompts


def test_csv_fields_are_strings_without_na_conversion(tmp_path):
    path = _write(tmp_path / "p.csv", b"prompt,n\nNA,1\nnull,2\nNone,3\nnan,4\n,5\n")
    df = read_prompts(path, keep_columns=["n"])
    assert df["prompt"].tolist() == ["NA", "null", "None", "nan", ""]
    assert df["n"].tolist() == ["1", "2", "3", "4", "5"]  # kept columns are copied as read


def test_blank_lines_are_rows_only_in_single_column_csv(tmp_path):
    single = _write(tmp_path / "single.csv", b"prompt\na\n\n  \nb\n")
    assert read_prompts(single)["prompt"].tolist() == ["a", "", "  ", "b"]  # as in TXT
    several = _write(tmp_path / "several.csv", b"prompt,id\na,1\n\nb,2\n")
    assert read_prompts(several, id_column="id")["prompt_id"].tolist() == ["1", "2"]


def test_prompt_column_is_detected_in_priority_order_and_any_case(tmp_path):
    both = write_table(tmp_path / "both.csv", {"TEXT": ["t"], "Caption": ["c"], "PROMPT": ["p"]})
    assert PromptSource(both).prompt_column == "PROMPT"
    caption = write_table(tmp_path / "caption.jsonl", {"text": ["t"], "Caption": ["c"]})
    assert PromptSource(caption).prompt_column == "Caption"
    assert read_prompts(both, prompt_column="TEXT")["prompt"].tolist() == ["t"]


def test_id_column_values_become_strings(tmp_path):
    parquet = write_table(tmp_path / "p.parquet", {"prompt": ["a", "b"], "id": [7, 8]})
    assert read_prompts(parquet, id_column="id")["prompt_id"].tolist() == ["7", "8"]
    jsonl = write_table(tmp_path / "p.jsonl", {"prompt": ["a", "b"], "id": [7, "x"]})
    assert read_prompts(jsonl, id_column="id")["prompt_id"].tolist() == ["7", "x"]


@pytest.mark.parametrize("name", ["p.parquet", "p.jsonl"])
def test_nulls_stay_none_and_empty_strings_stay_empty(tmp_path, name):
    path = write_table(tmp_path / name, {"prompt": ["x", None, ""]})
    assert read_prompts(path)["prompt"].tolist() == ["x", None, ""]


def test_jsonl_missing_prompt_key_is_null_and_blank_lines_are_skipped(tmp_path):
    path = _write(tmp_path / "p.jsonl", b'{"prompt": "a"}\n\n{"other": 1}\n{"prompt": "c"}')
    df = read_prompts(path)
    assert df["prompt"].tolist() == ["a", None, "c"] and df["row_index"].tolist() == [0, 1, 2]


def test_txt_lines_are_prompts(tmp_path):
    # a byte-order mark, CRLF, a blank line, a whitespace-only line, no final newline
    path = _write(tmp_path / "p.txt", b"\xef\xbb\xbffirst\r\n\n  \nlast")
    assert read_prompts(path)["prompt"].tolist() == ["first", "", "  ", "last"]
    one = _write(tmp_path / "one.txt", b"only\n")
    assert read_prompts(one)["prompt"].tolist() == ["only"]  # a trailing newline adds no row
    assert PromptSource(one).columns == []


def test_keep_columns_follow_the_output_columns_unchanged(tmp_path):
    path = write_table(tmp_path / "p.parquet", {"prompt": ["a", "b"], "score": [0.5, 1.5], "tag": ["x", "y"]})
    df = read_prompts(path, keep_columns=["tag", "score"])
    assert list(df.columns) == [*OUTPUT_COLUMNS, "tag", "score"]
    assert df["score"].tolist() == [0.5, 1.5] and df["tag"].tolist() == ["x", "y"]


def test_explicit_format_overrides_the_extension(tmp_path):
    path = _write(tmp_path / "prompts.dat", b"first\nsecond\n")
    assert read_prompts(path, fmt="txt")["prompt"].tolist() == ["first", "second"]


def test_parquet_count_rows_reads_only_the_footer(tmp_path, monkeypatch):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(1000)]}), path, row_group_size=100)
    source = PromptSource(path)

    def no_data(*args, **kwargs):
        raise AssertionError("count_rows read data pages")

    for method in ("iter_batches", "read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, method, no_data)
    monkeypatch.setattr(pq, "read_table", no_data)
    assert source.count_rows() == 1000


# ----------------------------------------------------------------------------- errors


def test_missing_file_and_directory(tmp_path):
    assert_input_error("no such file", tmp_path / "absent.csv")
    (tmp_path / "dir.csv").mkdir()
    assert_input_error("is a directory", tmp_path / "dir.csv")


@pytest.mark.parametrize("name", ["p.xlsx", "p.gz", "noext"])
def test_unknown_extension_lists_supported_ones(tmp_path, name):
    path = _write(tmp_path / name, b"prompt\na\n")
    supported = r"supported: \.csv, \.tsv, \.parquet, \.jsonl, \.txt"
    assert_input_error(f"unsupported file extension .*{supported}", path)


def test_unknown_format_and_gzipped_parquet(tmp_path):
    path = _write(tmp_path / "p.csv", b"prompt\na\n")
    assert_input_error("unknown format 'xls'; supported: csv, tsv, parquet, jsonl, txt", path, fmt="xls")
    gz = _write(tmp_path / "p.parquet.gz", b"x")
    assert_input_error("gzip-compressed parquet is not supported", gz)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_column": "nope"}, "prompt column 'nope' not found; available: caption, id"),
        ({"id_column": "nope"}, "id column 'nope' not found; available: caption, id"),
        ({"keep_columns": ["nope"]}, "keep column 'nope' not found; available: caption, id"),
        ({"keep_columns": ["caption"], "prompt_column": "id"}, None),
    ],
)
def test_unknown_columns_list_the_available_ones(tmp_path, kwargs, match):
    path = write_table(tmp_path / "p.csv", {"caption": ["a"], "id": ["1"]})
    if match is None:
        assert read_prompts(path, **kwargs)["caption"].tolist() == ["a"]
    else:
        assert_input_error(match, path, **kwargs)


def test_keep_column_clashing_with_an_output_column(tmp_path):
    path = write_table(tmp_path / "p.csv", {"prompt": ["a"], "row_index": ["9"]})
    match = "keep column 'row_index' clashes with an output column"
    assert_input_error(match, path, keep_columns=["row_index"])


@pytest.mark.parametrize("name", ["p.csv", "p.parquet", "p.jsonl"])
def test_no_prompt_like_column(tmp_path, name):
    path = write_table(tmp_path / name, {"title": ["a"], "url": ["u"]})
    assert_input_error(r"no prompt column found .*available: title, url", path)


def test_txt_has_no_columns_to_choose(tmp_path):
    path = _write(tmp_path / "p.txt", b"a\n")
    assert_input_error("txt file has no columns", path, id_column="id")


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("empty.csv", b"", "empty file"),
        ("header.csv", b"prompt,id\n", "no rows"),
        ("empty.txt", b"", "no rows"),
        ("empty.txt.gz", b"", "no rows"),
        ("empty.jsonl", b"\n\n", "empty file"),
    ],
)
def test_empty_inputs(tmp_path, name, data, match):
    assert_input_error(match, _write(tmp_path / name, data))


def test_parquet_without_rows(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    assert PromptSource(path).count_rows() == 0
    assert_input_error("no rows", path)


@pytest.mark.parametrize(
    ("name", "data", "where"),
    [
        ("p.csv", b"prompt\nok\nbad \xff byte\n", r"byte offset 14 \(line 3\)"),
        ("p.csv.gz", b"prompt\nok\nbad \xff byte\n", r"byte offset 14 \(line 3\) of the decompressed data"),
        ("p.txt", b"ok\n\xc3\x28\n", r"byte offset 3 \(line 2\)"),
        ("p.jsonl", b'{"prompt": "ok"}\n{"prompt": "\xe9t\xe9"}\n', r"byte offset 29 \(line 2\)"),
    ],
)
def test_undecodable_bytes_are_located(tmp_path, name, data, where):
    assert_input_error(f"not valid UTF-8 text: undecodable byte at {where}", _write(tmp_path / name, data))


def test_undecodable_byte_after_a_split_multibyte_character(tmp_path):
    # a valid 3-byte character straddles the 1 MiB read boundary; the bad byte comes after it
    data = b"a" * ((1 << 20) - 1) + "€".encode() + b"\n\xff\n"
    path = _write(tmp_path / "p.txt", data)
    assert_input_error(r"undecodable byte at byte offset 1048579 \(line 2\)", path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b'{"prompt": "a"}\n{"prompt": "b",}\n', r"line 2: malformed JSON \(.* at column \d+\)"),
        (b'{"prompt": "a"}\n\n["b"]\n', "line 3: expected a JSON object, got list"),
        (b'{"prompt": "a"}\n{"prompt": 5}\n', "line 2: prompt 'prompt' is a int, not a string"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, data, match):
    assert_input_error(match, _write(tmp_path / "p.jsonl", data))


def test_malformed_csv_names_the_line(tmp_path):
    path = _write(tmp_path / "p.csv", b"prompt,id\na,1\nb,2,extra\n")
    assert_input_error(r"malformed CSV \(.*line 3, saw 3\)", path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_parquet(tmp_path, damage):
    path = write_table(tmp_path / "p.parquet", {"prompt": PROMPTS})
    data = path.read_bytes()
    path.write_bytes(b"not parquet at all" if damage == "garbage" else data[: len(data) // 2])
    assert_input_error("corrupt or unreadable Parquet file", path)


def test_parquet_prompt_column_must_hold_strings(tmp_path):
    path = write_table(tmp_path / "p.parquet", {"prompt": [1, 2]})
    assert_input_error("prompt column 'prompt' holds int64, not strings", path)


@pytest.mark.parametrize("damage", ["not gzip", "truncated"])
def test_corrupt_gzip(tmp_path, damage):
    path = tmp_path / "p.csv.gz"
    data = gzip.compress(b"prompt\n" + b"some prompt text\n" * 5000)
    path.write_bytes(b"plain text, not gzip" if damage == "not gzip" else data[: len(data) // 2])
    assert_input_error("corrupt or truncated gzip data", path)


@pytest.mark.parametrize("name", ["p.csv", "p.jsonl", "p.parquet"])
def test_duplicate_ids_are_refused(tmp_path, name):
    path = write_table(tmp_path / name, {"prompt": ["a", "b", "c"], "id": ["x", "y", "x"]})
    err = assert_input_error(r"duplicate id 'x' in column 'id' \(rows 0 and 2\)", path, id_column="id")
    assert isinstance(err, InputError)


def test_duplicate_ids_across_batches(tmp_path):
    path = write_table(tmp_path / "p.csv", {"prompt": ["a", "b", "c"], "id": ["x", "y", "x"]})
    with pytest.raises(InputError, match="duplicate id 'x'"):
        list(PromptSource(path, id_column="id").iter_batches(rows=1))


def test_empty_ids_are_refused(tmp_path):
    path = write_table(tmp_path / "p.jsonl", {"prompt": ["a", "b"], "id": ["x", None]})
    assert_input_error("row 1 has an empty id in column 'id'", path, id_column="id")
