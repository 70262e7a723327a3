"""Prompts per UNet call: `--batch-size auto` sized from free accelerator memory, padding to one
static shape, and the next batch's text encoded ahead (`TextPrefetcher`).

`auto` is 16 off CUDA (the CPU default: larger batches buy nothing there). On CUDA the method
is probed on two small batches (its real peak memory, so a JVP method such as `sharpness` or a
large `--n-noise` is priced right), the line through the two peaks gives the bytes per prompt
and the fixed bytes per call, and the batch is the largest that fits in AUTO_MEMORY_FRACTION of
the free memory: a multiple of 8 (tensor-core friendly) at most AUTO_MAX_BATCH. It starts below
an out-of-memory; should an estimate still be short, the Scorer's OOM halving takes over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from memscan.errors import UsageError

CPU_BATCH_SIZE = 16
AUTO = "auto"
AUTO_MAX_BATCH = 64  # 128 UNet rows at n = 1: enough to fill one H100/H200 (benchmarks/README.md)
AUTO_MEMORY_FRACTION = 0.8  # headroom for the allocator's fragmentation and kernel workspaces
AUTO_MULTIPLE = 8
PROBE_SIZES = (2, 4)  # prompts in the two probe batches

BatchSize = int | str  # a positive int, or "auto"


def parse_batch_size(value: BatchSize) -> BatchSize:
    """`auto`, or a positive integer (int or digit string); anything else is a usage error."""
    if isinstance(value, bool):
        raise UsageError(f"--batch-size must be a positive integer or auto, got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if not text.isdigit():
            raise UsageError(f"--batch-size must be a positive integer or auto, got {value!r}")
        value = int(text)
    if not isinstance(value, int) or value < 1:
        raise UsageError(f"--batch-size must be >= 1 or auto, got {value!r}")
    return value


def auto_batch_size(
    free_bytes: float,
    per_prompt_bytes: float,
    *,
    fixed_bytes: float = 0,
    fraction: float = AUTO_MEMORY_FRACTION,
    maximum: int = AUTO_MAX_BATCH,
    multiple: int = AUTO_MULTIPLE,
) -> int:
    """The largest batch with `fixed + batch * per_prompt <= fraction * free`, rounded down to a
    multiple of `multiple` once it reaches one, within [1, maximum]."""
    if per_prompt_bytes <= 0:
        return maximum
    fits = int((fraction * free_bytes - fixed_bytes) // per_prompt_bytes)
    if fits >= multiple:
        fits -= fits % multiple
    return max(1, min(maximum, fits))


def per_prompt_cost(peaks: Mapping[int, float]) -> tuple[float, float]:
    """(bytes per prompt, fixed bytes per call) from the peak memory of two probe batch sizes.

    Peaks that do not grow with the batch (allocator noise) count wholly per prompt: the larger
    probe's peak over its size, nothing fixed, the pessimistic reading."""
    (small, low), (large, high) = sorted(peaks.items())
    slope = (high - low) / (large - small)
    if slope <= 0:
        return high / large, 0.0
    return slope, max(0.0, low - slope * small)


def padded_rows(rows: list[int], size: int) -> list[int]:
    """`rows` filled up to `size` with copies of its last row (one static batch shape for a
    compiled UNet); the padding's results are dropped by the caller. Never cuts."""
    return rows + rows[-1:] * (size - len(rows)) if rows else rows


def cuda_free_bytes(device: torch.device) -> int:
    """Memory a new allocation can get: the driver's free memory plus PyTorch's cached, unused
    blocks, within the process's cap (torch.cuda.set_per_process_memory_fraction) when one is set."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _device: 1.0)(device)
    return int(min(available, fraction * total - allocated))


def resolve_batch_size(
    spec: BatchSize,
    device: torch.device,
    *,
    probe: Callable[[int], float] | None = None,
    free_bytes: Callable[[], float] | None = None,
) -> int:
    """An explicit size as given; `auto` is CPU_BATCH_SIZE off CUDA, else sized from
    `probe(batch)` (the peak bytes one call of `batch` prompts adds) and the free memory read after it."""
    spec = parse_batch_size(spec)
    if isinstance(spec, int):
        return spec
    if device.type != "cuda" or probe is None:
        return CPU_BATCH_SIZE
    slope, fixed = per_prompt_cost({size: probe(size) for size in PROBE_SIZES})
    free = free_bytes() if free_bytes is not None else cuda_free_bytes(device)
    return auto_batch_size(free, slope, fixed_bytes=fixed)


def cuda_peak_bytes(device: torch.device, work: Callable[[], object]) -> int:
    """The peak bytes `work()` allocates on `device` above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    work()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


@dataclass
class _Pending:
    tokens: Any
    rows: list[int]
    future: Future


class TextPrefetcher:
    """Runs `encode(tokens, rows)` for the NEXT batch on a worker thread while the caller runs this
    batch's UNet, and tokenizes the next chunk of prompts on another.

    The work is the same as in sequence (same rows, same shapes), so the numbers are bit-identical.
    On CUDA the text encoder runs on a side stream; the caller's stream waits for it before using
    the embeddings. A request that does not match what was prefetched (the batch size was halved
    after an out-of-memory, or a failing batch is retried prompt by prompt) is encoded in place."""

    def __init__(self, encode: Callable[[Any, list[int]], torch.Tensor], device: torch.device) -> None:
        self._encode = encode
        self._device = device
        self._text = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memscan-text")
        self._tokens = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memscan-tokens")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: _Pending | None = None

    def tokenize_ahead(self, tokenize: Callable[[], Any]) -> Future:
        """Start `tokenize()` (the next chunk) on the tokenizer thread."""
        return self._tokens.submit(tokenize)

    def submit(self, tokens: Any, rows: list[int]) -> None:
        """Start encoding `rows` of `tokens` (the next batch); replaces any earlier request."""
        self._pending = _Pending(tokens, list(rows), self._text.submit(self._run, tokens, list(rows)))

    def take(self, tokens: Any, rows: list[int]) -> torch.Tensor:
        """The embeddings of `rows` of `tokens`: the prefetched ones if they match, else encoded now."""
        pending, self._pending = self._pending, None
        if pending is None or pending.tokens is not tokens or pending.rows != list(rows):
            return self._encode(tokens, rows)
        embeds, event = pending.future.result()
        if event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(event)
            embeds.record_stream(current)  # freed with respect to the stream that uses it
        return embeds

    def _run(self, tokens: Any, rows: list[int]) -> tuple[torch.Tensor, Any]:
        with torch.inference_mode():  # grad mode is per thread
            if self._stream is None:
                return self._encode(tokens, rows), None
            with torch.cuda.stream(self._stream):
                embeds = self._encode(tokens, rows)
                event = torch.cuda.Event()
                event.record(self._stream)
            return embeds, event

    def close(self) -> None:
        """Wait for the threads' work and stop them."""
        self._pending = None
        self._text.shutdown(wait=True)
        self._tokens.shutdown(wait=True)
