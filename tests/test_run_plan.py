"""Shard plans: deterministic, from Parquet footers, text staged once; bounded memory at scale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memscan.errors import InputError
from memscan.io.readers import PromptSource
from memscan.run.plan import InputFile, Shard, expand_inputs, make_plan, stage_text_input


def test_plan_is_a_pure_function_of_inputs_and_shard_size() -> None:
    inputs = [InputFile("/a.parquet", 25, 1), InputFile("/b.csv", 0, 1), InputFile("/c.txt", 10, 1)]
    plan = make_plan(inputs, 10)
    assert plan == [Shard(0, 0, 0, 10), Shard(1, 0, 10, 20), Shard(2, 0, 20, 25), Shard(3, 2, 0, 10)]
    assert make_plan(inputs, 10) == plan
    assert sum(s.rows for s in make_plan(inputs, 7)) == 35
    assert plan[3].name == "part-00003"


def test_expand_inputs_sorts_folders_and_globs(tmp_path: Path) -> None:
    for name in ("b.csv", "a.txt", "c.parquet.bak", "d.jsonl.gz"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in expand_inputs(tmp_path)] == ["a.txt", "b.csv", "d.jsonl.gz"]
    assert [p.name for p in expand_inputs(tmp_path / "*.csv")] == ["b.csv"]
    with pytest.raises(InputError):
        expand_inputs(tmp_path / "*.tsv")


def test_staged_text_input_reads_back_identically(tmp_path: Path) -> None:
    src = tmp_path / "p.csv"
    pd.DataFrame({"caption": [f"prompt {i}" if i % 7 else "" for i in range(1000)]}).to_csv(src, index=False)
    source = PromptSource(src)
    rows = stage_text_input(source, tmp_path / "staged.parquet", shard_size=128)
    assert rows == 1000
    assert pq.ParquetFile(tmp_path / "staged.parquet").metadata.row_group(0).num_rows == 128
    staged = PromptSource(tmp_path / "staged.parquet", prompt_column="prompt", id_column="prompt_id")
    pd.testing.assert_frame_equal(staged.read(), source.read())
    pd.testing.assert_frame_equal(staged.read_range(300, 450), source.read().iloc[300:450].reset_index(drop=True))


_PLAN_SCRIPT = """
import json, resource, sys, time
from pathlib import Path
from memscan.config import DetectSettings
from memscan.io.readers import PromptSource
from memscan.run.plan import InputFile, make_plan
import pyarrow.parquet as pq

path = Path(sys.argv[1])
calls = []
original = pq.ParquetFile.iter_batches
def spy(self, *args, **kwargs):
    calls.append(1)
    return original(self, *args, **kwargs)
pq.ParquetFile.iter_batches = spy
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
rows = PromptSource(path).count_rows()
plan = make_plan([InputFile(str(path), rows, path.stat().st_size)], 10_000)
print(json.dumps({"rows": rows, "shards": len(plan), "data_reads": len(calls),
                  "seconds": time.perf_counter() - start,
                  "rss_after_imports_mb": base,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_millions_of_rows_are_planned_from_metadata_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.parquet"
    rows, chunk = 3_000_000, 500_000
    with pq.ParquetWriter(path, pa.schema([("prompt", pa.string())])) as writer:
        for start in range(0, rows, chunk):
            texts = [f"caption number {i} of a large set" for i in range(start, start + chunk)]
            writer.write_table(pa.table({"prompt": texts}))
    result = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    print("planning facts:", facts)
    assert facts["rows"] == rows and facts["shards"] == 300 and facts["data_reads"] == 0
    # the prompts are ~130 MB of strings: planning them must not raise the peak beyond the imports
    assert facts["peak_rss_mb"] - facts["rss_after_imports_mb"] < 20
