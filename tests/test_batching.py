"""Batch sizes: `auto` from free accelerator memory (numbers injected: no CUDA needed), padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from memscan.config import DetectSettings
from memscan.errors import UsageError
from memscan.methods.anisotropy import AnisotropyMethod
from memscan.models.batching import (
    AUTO_MAX_BATCH,
    CPU_BATCH_SIZE,
    PROBE_SIZES,
    auto_batch_size,
    padded_rows,
    parse_batch_size,
    per_prompt_cost,
    resolve_batch_size,
)
from memscan.models.loading import ScoringModel
from memscan.scorer import Scorer

MiB = 2**20
GiB = 2**30


def test_auto_batch_size_is_the_largest_multiple_of_8_that_fits() -> None:
    # (0.8 * 10 GiB - 1 GiB) / 100 MiB = 71.7 prompts -> 64
    assert auto_batch_size(10 * GiB, 100 * MiB, fixed_bytes=1 * GiB, maximum=256) == 64
    # (0.8 * 80 GiB - 2 GiB) / 500 MiB = 127 prompts -> 120
    assert auto_batch_size(80 * GiB, 500 * MiB, fixed_bytes=2 * GiB, maximum=256) == 120
    assert auto_batch_size(80 * GiB, 500 * MiB, fixed_bytes=2 * GiB) == AUTO_MAX_BATCH == 64


def test_auto_batch_size_below_eight_is_not_rounded_and_never_below_one() -> None:
    assert auto_batch_size(1 * GiB, 300 * MiB) == 2  # 819 MiB / 300 MiB = 2.7
    assert auto_batch_size(1 * GiB, 3 * GiB) == 1  # not even one fits: one, and OOM halving marks it
    assert auto_batch_size(1 * GiB, 10 * MiB, fixed_bytes=2 * GiB) == 1


def test_auto_batch_size_with_a_free_per_prompt_cost_takes_the_maximum() -> None:
    assert auto_batch_size(1 * GiB, 0) == AUTO_MAX_BATCH


def test_per_prompt_cost_is_the_line_through_the_probe_peaks() -> None:
    assert per_prompt_cost({2: 1200, 4: 2000}) == (400.0, 400.0)
    assert per_prompt_cost({4: 2000, 2: 1200}) == (400.0, 400.0)


def test_flat_or_falling_probe_peaks_count_all_memory_per_prompt() -> None:
    """Allocator noise must not give a free prompt: the larger probe's peak over its size."""
    assert per_prompt_cost({2: 1000, 4: 1000}) == (250.0, 0.0)
    assert per_prompt_cost({2: 1000, 4: 900}) == (225.0, 0.0)


def test_auto_on_cuda_probes_the_method_and_reads_free_memory() -> None:
    probed: list[int] = []

    def probe(batch: int) -> int:  # what one batch of `batch` prompts peaks at: 1 GiB + 300 MiB a prompt
        probed.append(batch)
        return 1 * GiB + batch * 300 * MiB

    size = resolve_batch_size("auto", torch.device("cuda"), probe=probe, free_bytes=lambda: 40 * GiB)
    assert probed == list(PROBE_SIZES)
    assert size == auto_batch_size(40 * GiB, 300 * MiB, fixed_bytes=1 * GiB) == 64
    small = resolve_batch_size("auto", torch.device("cuda:1"), probe=probe, free_bytes=lambda: 8 * GiB)
    assert small == 16  # (6.4 GiB - 1 GiB) / 300 MiB = 18.4 -> 16


def test_auto_off_cuda_is_the_cpu_default_and_probes_nothing() -> None:
    def probe(batch: int) -> int:
        raise AssertionError("no probe off CUDA")

    for device in ("cpu", "mps"):
        assert resolve_batch_size("auto", torch.device(device), probe=probe) == CPU_BATCH_SIZE == 16


def test_an_explicit_batch_size_is_kept() -> None:
    assert resolve_batch_size(48, torch.device("cuda"), probe=None, free_bytes=lambda: 0) == 48
    assert resolve_batch_size("24", torch.device("cpu")) == 24


@pytest.mark.parametrize("value", ["0", "-3", "big", "", "1.5", 0, True])
def test_bad_batch_sizes_are_usage_errors(value: object) -> None:
    with pytest.raises(UsageError, match="--batch-size"):
        parse_batch_size(value)  # type: ignore[arg-type]


def test_parse_batch_size() -> None:
    assert parse_batch_size("auto") == "auto"
    assert parse_batch_size(" AUTO ") == "auto"
    assert parse_batch_size("32") == 32
    assert parse_batch_size(8) == 8


def test_padded_rows_repeat_the_last_row() -> None:
    assert padded_rows([3, 5, 7], 5) == [3, 5, 7, 7, 7]
    assert padded_rows([3, 5], 2) == [3, 5]
    assert padded_rows([3, 5, 7], 2) == [3, 5, 7]  # never cut


def test_settings_accept_auto_and_numbers() -> None:
    assert DetectSettings(batch_size="auto").batch_size == "auto"  # type: ignore[arg-type]
    assert DetectSettings(batch_size="32").batch_size == 32  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--batch-size"):
        DetectSettings(batch_size="lots")  # type: ignore[arg-type]


def test_scorer_auto_on_cpu_is_the_cpu_default(tiny_model: ScoringModel) -> None:
    scorer = Scorer(tiny_model, AnisotropyMethod(), batch_size="auto")
    assert scorer.batch_size == CPU_BATCH_SIZE


def test_detect_cli_batch_size_auto_on_cpu(tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path) -> None:
    from memscan.cli import app

    out = tmp_path / "scores.parquet"
    args = ["detect", str(prompts_csv), "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--batch-size", "auto"])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(app, [*args, "--batch-size", "lots", "--if-exists", "overwrite"])
    assert bad.exit_code == 2 and "--batch-size" in bad.stderr and "Traceback" not in bad.output


def test_speed_options_do_not_change_a_run_directory_fingerprint() -> None:
    """A run started without --compile resumes with it (and manifests written before these
    settings existed have none of their keys)."""
    from memscan.run.job import fingerprint_fields

    plain = fingerprint_fields(DetectSettings(), [], 100)
    fast = fingerprint_fields(DetectSettings(batch_size=64, compile=True, prefetch=True, channels_last=False), [], 100)
    assert fast == plain
    assert not {"compile", "prefetch", "channels_last", "batch_size"} & set(plain)


def test_detect_cli_compile_reaches_the_scorer(
    tiny_model_dir: Path, prompts_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--compile compiles the UNet (stubbed here: inductor takes minutes on a CPU; the real
    compile is tests/test_scorer.py::test_compile_flag_scores_equal_the_eager_fp32_path)."""
    from memscan.cli import app

    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr("memscan.scorer.compile_unet", compiled.append)
    out = tmp_path / "scores.parquet"
    args = ["detect", str(prompts_csv), "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert CliRunner().invoke(app, args).exit_code == 0 and compiled == []
    result = CliRunner().invoke(app, [*args, "--compile", "--if-exists", "overwrite"])
    assert result.exit_code == 0, result.output
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "UNet2DConditionModel"


def test_scorer_auto_probes_its_method_for_the_batch_size(
    tiny_model: ScoringModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA path of `auto` on a CPU stand-in: the Scorer scores real probe batches of 2 and 4
    prompts (the CUDA peak-memory reading and the free memory are injected)."""
    import memscan.scorer as scorer_module
    from memscan.models import batching

    probed: list[int] = []

    def peak(device: torch.device, work):  # type: ignore[no-untyped-def]
        rows = len(work()["score"])  # the method really runs
        probed.append(rows)
        return 1 * GiB + rows * 300 * MiB

    def on_cuda(spec, device, *, probe):  # type: ignore[no-untyped-def]
        return batching.resolve_batch_size(spec, torch.device("cuda"), probe=probe, free_bytes=lambda: 8 * GiB)

    monkeypatch.setattr(scorer_module, "cuda_peak_bytes", peak)
    monkeypatch.setattr(scorer_module, "resolve_batch_size", on_cuda)
    scorer = Scorer(tiny_model, AnisotropyMethod(), batch_size="auto")
    assert probed == [2, 4] and scorer.batch_size == 16  # (6.4 GiB - 1 GiB) / 300 MiB = 18.4 -> 16
    assert scorer.score_texts(["a cat", "a dog"]).status.tolist() == ["ok", "ok"]
