"""Scorer: one loaded model, one method and one noise bank turning prompts into score rows.

It is the unit a worker holds for its whole life: the model loads once, the unconditional
pass runs once, then any number of prompt frames (a whole file or one shard) are scored.
Identical prompts (same token ids after truncation) are scored once. Failures are data:
out-of-memory halves the batch (and remembers it) down to one prompt, then marks the row
`oom`; any other error is isolated to its prompt and marks it `error`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch

from memscan.errors import one_line
from memscan.io.scores import STATUS_ERROR, STATUS_NONFINITE, STATUS_OK, STATUS_OOM, STATUS_SKIPPED_EMPTY
from memscan.methods.base import DetectionMethod
from memscan.models.batching import BatchSize, TextPrefetcher, cuda_peak_bytes, padded_rows, resolve_batch_size
from memscan.models.device import compile_unet, eager_forward, is_compiled, on_cuda_by_default, set_channels_last
from memscan.models.loading import ScoringModel
from memscan.models.noise import noise_bank
from memscan.models.text import TokenizedPrompts, encode_ids, tokenize

log = logging.getLogger("memscan")


@dataclass
class ScoredTexts:
    """Per-prompt method columns (float32), truncation flags, statuses and errors, in input order."""

    columns: dict[str, np.ndarray]
    truncated: np.ndarray
    status: np.ndarray
    error: np.ndarray
    unique: int
    reused: np.ndarray | None = None  # read from the score cache (memscan.cache), per prompt


@dataclass
class _Unique:
    """Results for the unique prompts scored so far."""

    values: dict[str, list[float]]
    status: list[str]
    error: list[str | None]
    reused: list[bool] = field(default_factory=list)


class Scorer:
    """Scores prompts with `method` on `model`, every prompt on the same noise bank."""

    def __init__(
        self,
        model: ScoringModel,
        method: DetectionMethod,
        *,
        n_noise: int = 1,
        seed: int = 51,
        batch_size: BatchSize = 16,
        threshold: float | None = None,
        compile: bool = False,
        prefetch: bool | None = None,
        channels_last: bool | None = None,
    ) -> None:
        """`batch_size` may be `auto` (memscan.models.batching). The speed options (None: on CUDA
        only) change the model for every Scorer that shares it: `channels_last` stores the UNet's
        weights so (False: back to contiguous; None off CUDA: left as it is), `compile` compiles
        its forward (never undone here); `prefetch` encodes the next batch's text ahead."""
        if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.method = method
        self.n_noise = n_noise
        self.seed = seed
        self.threshold = threshold
        self.noise = noise_bank(n_noise, model.latent_shape, seed, device=model.device, dtype=model.dtype)
        self._state: Any = None
        self._prefetcher: TextPrefetcher | None = None
        self._tokenizer_copy: Any = None  # the tokenizer thread's own (see memscan.models.text.tokenize)
        self.cache: Any = None  # a bound memscan.cache.ScoreCache: rows it holds are read, not scored
        self.pad_batches = False  # the `auto` probe scores unpadded batches
        self.prefetch = on_cuda_by_default(prefetch, model.device)
        if channels_last is not None or model.device.type == "cuda":
            set_channels_last(model.unet, on_cuda_by_default(channels_last, model.device))
        self.batch_size = resolve_batch_size(batch_size, model.device, probe=self._probe_peak_bytes)
        if compile:
            compile_unet(model.unet)
        # one static batch shape for a compiled UNet (the shared pass runs eagerly): the last
        # batch is filled up, the filling dropped
        self.pad_batches = is_compiled(model.unet)

    @property
    def state(self) -> Any:
        """The method's prompt-independent state (the shared unconditional pass), made once."""
        if self._state is None:
            with torch.inference_mode(), eager_forward(self.model.unet):  # once: not worth compiling its shape
                self._state = self.method.prepare(self.model, self.noise)
        return self._state

    def _probe_peak_bytes(self, prompts: int) -> int:
        """CUDA: the peak memory one batch of `prompts` (empty) prompts adds, on the eager UNet."""
        state = self.state
        tokens = tokenize(self.model, [""] * prompts)
        with eager_forward(self.model.unet):
            return cuda_peak_bytes(self.model.device, lambda: self._score_batch(tokens, list(range(prompts)), state))

    def run_facts(self) -> dict[str, Any]:
        return {
            **self.model.describe(), **self.method.run_facts(), "dtype": str(self.model.dtype).removeprefix("torch."),
            "seed": self.seed, "n_noise": self.n_noise, "threshold": self.threshold,
        }

    # ------------------------------------------------------------------ prompts -> numbers

    def score_texts(
        self, prompts: Sequence[str], *, chunk: int = 4096, progress: Callable[[int], None] | None = None
    ) -> ScoredTexts:
        """Score non-empty prompts; duplicates (same token ids) cost one evaluation.

        Prompts are tokenized `chunk` at a time so memory stays bounded on large inputs.
        `progress` is told the prompts done after every batch (a chunk's duplicates at its end)."""
        slots: dict[bytes, int] = {}
        unique = _Unique(values={c: [] for c in self.method.columns}, status=[], error=[])
        gather: list[int] = []
        truncated: list[bool] = []
        prefetcher = None
        if self.prefetch:
            _ = self.state  # the shared pass tokenizes too: before the threads start
            prefetcher = self._prefetcher = TextPrefetcher(self._encode, self.model.device)
        try:
            for tokens in self._token_chunks(prompts, chunk, prefetcher):
                self._score_chunk(tokens, slots, unique, gather, truncated, progress)
        finally:
            self._prefetcher = None
            if prefetcher is not None:
                prefetcher.close()
        index = np.asarray(gather, dtype=np.int64)
        return ScoredTexts(
            columns={c: np.asarray(v, dtype=np.float32)[index] for c, v in unique.values.items()},
            truncated=np.asarray(truncated, dtype=bool),
            status=np.asarray(unique.status, dtype=object)[index],
            error=np.asarray(unique.error, dtype=object)[index],
            unique=len(slots),
            reused=np.asarray(unique.reused, dtype=bool)[index],
        )

    def _token_chunks(
        self, prompts: Sequence[str], chunk: int, prefetcher: TextPrefetcher | None
    ) -> Iterator[TokenizedPrompts]:
        """`prompts` tokenized `chunk` at a time, in order; with a prefetcher, the chunk after the
        first is tokenized on its thread while the one before is scored."""
        starts = range(0, len(prompts), chunk)
        ahead = None
        for i, start in enumerate(starts):
            tokens = tokenize(self.model, prompts[start : start + chunk]) if ahead is None else ahead.result()
            if prefetcher is not None and i + 1 < len(starts):
                if self._tokenizer_copy is None:
                    self._tokenizer_copy = copy.deepcopy(self.model.tokenizer)
                following = starts[i + 1]
                ahead = prefetcher.tokenize_ahead(self._tokenize_on_thread(prompts[following : following + chunk]))
            yield tokens

    def _tokenize_on_thread(self, prompts: Sequence[str]) -> Callable[[], TokenizedPrompts]:
        """Tokenization of `prompts` with the thread's own copy of the tokenizer."""
        return partial(tokenize, self.model, prompts, tokenizer=self._tokenizer_copy)

    def _score_chunk(
        self, tokens: TokenizedPrompts, slots: dict[bytes, int], unique: _Unique, gather: list[int],
        truncated: list[bool], progress: Callable[[int], None] | None,
    ) -> None:
        """Score the prompts of one tokenized chunk not seen before (the cache's rows are read, not
        scored); note where each one's results are."""
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest()
                for row in tokens.input_ids.numpy().astype(np.int32)]  # = memscan.cache.token_key
        first: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in slots and key not in first:
                first[key] = i
        new_rows = list(first.values())
        read = 0
        if self.cache is not None and new_rows:
            misses = self._read_cached([keys[i] for i in new_rows], new_rows, slots, unique, progress)
            read, new_rows = len(new_rows) - len(misses), misses
        for i in new_rows:
            slots[keys[i]] = len(slots)
        start = len(unique.status)
        self._score_rows(tokens, new_rows, unique, progress)
        unique.reused += [False] * len(new_rows)
        if self.cache is not None and new_rows:
            self._stage_scored(unique, start, [keys[i] for i in new_rows])
        gather += [slots[key] for key in keys]
        truncated += tokens.truncated
        duplicates = len(tokens.truncated) - len(new_rows) - read
        if progress is not None and duplicates:
            progress(duplicates)

    def _read_cached(
        self, keys: list[bytes], rows: list[int], slots: dict[bytes, int], unique: _Unique,
        progress: Callable[[int], None] | None,
    ) -> list[int]:
        """Take the cache's rows for `rows` (with their `keys`) into `unique`; return the rows it misses."""
        found = self.cache.lookup(keys)
        hit = found["hit"].to_numpy()
        for key, is_hit in zip(keys, hit, strict=True):
            if is_hit:
                slots[key] = len(slots)
        for name in self.method.columns:
            unique.values[name].extend(found[name].to_numpy()[hit].tolist())
        count = int(hit.sum())
        unique.status.extend([STATUS_OK] * count)
        unique.error.extend([None] * count)
        unique.reused.extend([True] * count)
        if progress is not None and count:
            progress(count)
        return [row for row, is_hit in zip(rows, hit, strict=True) if not is_hit]

    def _stage_scored(self, unique: _Unique, start: int, keys: list[bytes]) -> None:
        """Hand the cache the rows just scored (from `start` in `unique`) that are ok and finite."""
        values = {name: np.asarray(unique.values[name][start:], dtype=np.float32) for name in self.method.columns}
        good = (np.asarray(unique.status[start:], dtype=object) == STATUS_OK) & np.isfinite(values["score"])
        self.cache.scored(len(keys))
        self.cache.stage([key for key, ok in zip(keys, good, strict=True) if ok],
                         {name: column[good] for name, column in values.items()})

    def _score_rows(
        self, tokens: TokenizedPrompts, rows: list[int], out: _Unique, progress: Callable[[int], None] | None = None
    ) -> None:
        """Append results for `rows` of `tokens` to `out`, `batch_size` prompts per UNet call."""
        state = self.state
        position = 0
        while position < len(rows):
            batch = rows[position : position + self.batch_size]
            upcoming = rows[position + len(batch) : position + len(batch) + self.batch_size]
            try:
                values = self._score_batch(tokens, batch, state, upcoming)
            except torch.OutOfMemoryError as exc:
                if len(batch) > 1:
                    halved = self.batch_size // 2
                    self.batch_size = max(1, halved if halved < len(batch) else len(batch) // 2)
                    log.warning("out of memory at batch size %d; retrying with %d", len(batch), self.batch_size)
                    _release_memory()
                    continue
                self._append_failure(out, STATUS_OOM, one_line(exc, limit=300))
            except Exception as exc:  # noqa: BLE001 - a failing prompt must not sink the shard
                if len(batch) > 1:  # isolate the prompt that fails
                    for row in batch:
                        self._score_rows(tokens, [row], out, progress)
                    position += len(batch)
                    continue
                self._append_failure(out, STATUS_ERROR, one_line(exc, with_type=True, limit=300))
            else:
                for name in self.method.columns:
                    out.values[name].extend(values[name].tolist())
                out.status.extend([STATUS_OK] * len(batch))
                out.error.extend([None] * len(batch))
            if progress is not None:
                progress(len(batch))
            position += len(batch)

    def _score_batch(
        self, tokens: TokenizedPrompts, rows: list[int], state: Any, upcoming: list[int] | None = None
    ) -> dict[str, np.ndarray]:
        """The method's columns for `rows`; the text of `upcoming` (the next batch) starts encoding
        ahead when prefetching. Padded batches (a compiled UNet) drop their filling here."""
        size = len(rows)
        if self.pad_batches:
            rows = padded_rows(rows, self.batch_size)
            upcoming = padded_rows(upcoming, self.batch_size) if upcoming else upcoming
        prefetcher = self._prefetcher
        with torch.inference_mode():
            embeds = prefetcher.take(tokens, rows) if prefetcher is not None else self._encode(tokens, rows)
            if prefetcher is not None and upcoming:
                prefetcher.submit(tokens, upcoming)
            values = self.method.score(self.model, state, self.noise, embeds)
            return {name: values[name][:size].float().cpu().numpy() for name in self.method.columns}

    def _encode(self, tokens: TokenizedPrompts, rows: list[int]) -> torch.Tensor:
        """Text-encoder hidden states of `rows` of `tokens`."""
        idx = torch.tensor(rows, dtype=torch.long)
        batch = TokenizedPrompts(
            input_ids=tokens.input_ids[idx], attention_mask=tokens.attention_mask[idx], truncated=[]
        )
        with torch.inference_mode():
            return encode_ids(self.model, batch)

    def _append_failure(self, out: _Unique, status: str, error: str) -> None:
        for name in self.method.columns:
            out.values[name].append(float("nan"))
        out.status.append(status)
        out.error.append(error)

    # ------------------------------------------------------------------ frames -> rows

    def score_frame(self, frame: pd.DataFrame, *, progress: Callable[[int], None] | None = None) -> pd.DataFrame:
        """Output rows for a canonical prompt frame (`prompt_id`, `prompt`): one per input row.

        `progress` is told the rows done after every batch; empty rows count at the end."""
        prompts = frame["prompt"]
        is_empty = (prompts.isna() | (prompts.fillna("").astype(str).str.strip() == "")).to_numpy()
        scored = self.score_texts(prompts[~is_empty].astype(str).tolist(), progress=progress)
        if progress is not None and is_empty.any():
            progress(int(is_empty.sum()))
        rows, ok = len(frame), ~is_empty
        out = pd.DataFrame({
            "prompt_id": frame["prompt_id"].astype(str).to_numpy(),
            "prompt": pd.Series(prompts.to_numpy(), dtype=object),  # keeps None as None
        })
        for name in self.method.columns:
            column = np.full(rows, np.nan, dtype=np.float32)
            column[ok] = scored.columns[name]
            out[name] = column
        truncated = np.zeros(rows, dtype=bool)
        truncated[ok] = scored.truncated
        out["truncated"] = truncated
        status = np.full(rows, STATUS_SKIPPED_EMPTY, dtype=object)
        error = np.full(rows, "empty prompt", dtype=object)
        status[ok], error[ok] = scored.status, scored.error
        nonfinite = (status == STATUS_OK) & ~np.isfinite(out["score"].to_numpy())
        status[nonfinite], error[nonfinite] = STATUS_NONFINITE, "score is not finite"
        out["status"] = pd.Series(status, dtype=object)
        out["error"] = pd.Series(error, dtype=object)
        flagged = pd.array([None] * rows, dtype="boolean")
        if self.threshold is not None:
            flagged = pd.array(out["score"].to_numpy() > self.threshold, dtype="boolean")
            flagged[status != STATUS_OK] = pd.NA
        out["flagged"] = flagged
        if self.cache is not None:  # rows read from the cache, rows scored (duplicates of a scored prompt too)
            reused = int(scored.reused.sum()) if scored.reused is not None else 0
            out.attrs["cache"] = {"reused": reused, "scored": int(ok.sum()) - reused}
        return out


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
