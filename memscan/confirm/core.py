"""`confirm`: labels from generations. k images per prompt, near-duplicates across seeds, a labelled file.

The library behind `memscan confirm PROMPTS --model M -o labels.csv`: the settings, the
`Confirmer` (one loaded model with its VAE, its DDIM pipeline, the embedder and the training
images' vectors, made once per process) and `confirm`, the single-file entry point. Run
directories are memscan.confirm.run's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from memscan import __version__
from memscan.config import DetectSettings
from memscan.confirm.decision import MEMORIZED, NOT_MEMORIZED, default_min_cluster, prompt_evidence
from memscan.confirm.embedders import BUILTIN, DEFAULT_THRESHOLDS, check_embedder, make_embedder
from memscan.confirm.generate import ddim_pipeline, generate_images
from memscan.errors import InputError, UsageError, one_line
from memscan.io.scores import STATUS_ERROR, STATUS_NONFINITE, STATUS_OK, STATUS_OOM, STATUS_SKIPPED_EMPTY
from memscan.models.loading import ScoringModel
from memscan.storage import location

log = logging.getLogger("memscan")

FILE_SUFFIXES = (".csv", ".parquet")
_FLOATS = ("cluster_distance", "near_duplicate_fraction", "pair_distance_mean", "pair_distance_min",
           "pair_distance_max", "train_distance", "nearest_train_distance")
COLUMNS = ("prompt_id", "prompt", "label", "reason", "cluster_distance", "largest_cluster", "near_duplicate_fraction",
           "pair_distance_mean", "pair_distance_min", "pair_distance_max", "train_distance", "train_id",
           "train_matches", "nearest_train_distance", "status", "error")


@dataclass(frozen=True)
class ConfirmSettings:
    """What `memscan confirm` was asked to do. `detect` carries the model and input settings
    (model, device, dtype, architecture, allow_pickle, prompt and id columns, store_prompt)."""

    detect: DetectSettings = field(default_factory=lambda: DetectSettings(batch_size=1))
    k: int = 4  # generations per prompt
    seed: int = 0  # generation j starts from seed + j
    steps: int = 50  # DDIM steps
    guidance: float = 7.5
    batch_size: int = 16  # images per pipeline call (halved on out-of-memory)
    embedder: str = "vae"  # pixel, vae, or a CLIP/DINO model folder or hub id
    threshold: float | None = None  # near-duplicate distance; None: the embedder's default
    min_cluster: int | None = None  # generations that must be one image; None: max(2, ceil(k / 2))
    train_images: str | None = None  # a folder, .parquet or .npz of training images
    contact_sheet: bool = False  # keep each prompt's images as a PNG strip (`sheet_png`)
    train_roundtrip: bool = True  # compare generations with the training images' VAE round trip

    def __post_init__(self) -> None:
        if self.k < 2:
            raise UsageError(f"--k must be >= 2 (near-duplicates need two generations), got {self.k}")
        if self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.threshold is not None and not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise UsageError(f"--threshold must be a positive distance, got {self.threshold}")
        if self.min_cluster is not None and not 2 <= self.min_cluster <= self.k:
            raise UsageError(f"--min-cluster must be between 2 and --k ({self.k}), got {self.min_cluster}")

    def resolved(self) -> ConfirmSettings:
        """Every default made explicit and every path absolute, as workers and the fingerprint see them.

        Checks the embedder name and that the training images exist (one line each), before any model loads."""
        embedder = check_embedder(self.embedder)
        kind = embedder if embedder in BUILTIN else "model"
        train = self.train_images
        if train is not None:
            if not Path(train).expanduser().exists():
                raise InputError(f"--train-images {train}: no such file or folder")
            train = str(Path(train).expanduser().resolve())
        return replace(
            self, embedder=embedder, train_images=train,
            threshold=self.threshold if self.threshold is not None else DEFAULT_THRESHOLDS[kind],
            min_cluster=self.min_cluster if self.min_cluster is not None else default_min_cluster(self.k),
        )

    def fields(self) -> dict[str, Any]:
        """The settings that change the labels, as JSON values (the model's are `detect`'s)."""
        return {k: v for k, v in asdict(self).items() if k != "detect"}


def output_schema(*, store_prompt: bool = True, sheet: bool = False) -> pa.Schema:
    """The labelled file: ids, label, evidence, status (and the PNG strip with a contact sheet)."""
    fields = [pa.field("prompt_id", pa.string(), nullable=False)]
    if store_prompt:
        fields.append(pa.field("prompt", pa.string()))
    fields += [pa.field("label", pa.string()), pa.field("reason", pa.string())]
    for name in COLUMNS[4:-2]:
        counts = name in ("largest_cluster", "train_matches")
        fields.append(pa.field(name, pa.string() if name == "train_id" else pa.int32() if counts else pa.float32()))
    fields += [pa.field("status", pa.string(), nullable=False), pa.field("error", pa.string())]
    if sheet:
        fields.append(pa.field("sheet_png", pa.binary()))
    return pa.schema(fields)


class Confirmer:
    """One loaded model (with its VAE) turning prompt frames into labelled rows; made once per process."""

    def __init__(self, model: ScoringModel, settings: ConfirmSettings) -> None:
        from memscan.confirm.train_images import TrainImages

        self.model = model
        self.settings = settings = settings.resolved()
        self.pipeline = ddim_pipeline(model)
        self.embedder = make_embedder(settings.embedder, model)
        self.threshold = float(settings.threshold)  # type: ignore[arg-type]  # resolved
        self.min_cluster = int(settings.min_cluster)  # type: ignore[arg-type]  # resolved
        self.batch_size = settings.batch_size
        self.train: TrainImages | None = None
        self.train_vectors: np.ndarray | None = None
        if settings.train_images is not None:
            self.train = TrainImages(settings.train_images, side=int(model.profile.resolution))
            prepare = vae_roundtrip if settings.train_roundtrip else (lambda _, images: images)
            self.train_vectors = np.concatenate([self.embedder.embed(prepare(model, b)) for b in self.train.batches()])

    def facts(self) -> dict[str, Any]:
        """What the labels were made with (the output's metadata)."""
        return {
            **self.model.describe(), "dtype": str(self.model.dtype).removeprefix("torch."),
            "command": "confirm", "memscan_version": __version__, **self.settings.fields(),
            "metric": self.embedder.metric, "train_images_count": None if self.train is None else len(self.train),
        }

    # ------------------------------------------------------------------ prompts -> labels

    def confirm_frame(self, frame: pd.DataFrame, progress: Callable[[int], None] | None = None) -> pd.DataFrame:
        """One row per input row (prompt_id, prompt): label, evidence, status. Identical prompts are
        generated once; `progress` hears of the rows done after every pipeline call."""
        texts = frame["prompt"]
        empty = (texts.isna() | (texts.fillna("").astype(str).str.strip() == "")).to_numpy()
        unique: dict[str, int] = {}
        for text, skip in zip(texts, empty, strict=True):
            if not skip and text not in unique:
                unique[text] = len(unique)
        results: list[dict[str, Any] | None] = [None] * len(unique)
        prompts = list(unique)
        per_call = max(1, self.batch_size // self.settings.k)
        position = 0
        while position < len(prompts):
            chunk = prompts[position : position + per_call]
            done = self._confirm_chunk(chunk, results, position)
            if done == 0:  # out of memory: the batch was halved, try the same prompts again
                per_call = max(1, self.batch_size // self.settings.k)
                continue
            position += done
            if progress is not None:
                progress(done)
        rows = []
        for (_, row), skip in zip(frame.iterrows(), empty, strict=True):
            base = {"prompt_id": str(row["prompt_id"]), "prompt": row["prompt"]}
            if skip:
                rows.append({**base, **_failed(STATUS_SKIPPED_EMPTY, None)})
            else:
                rows.append({**base, **results[unique[row["prompt"]]]})  # type: ignore[dict-item]
        duplicates = int((~empty).sum()) - len(unique) + int(empty.sum())
        if progress is not None and duplicates:
            progress(duplicates)
        out = pd.DataFrame(rows, columns=[*COLUMNS, *(["sheet_png"] if self.settings.contact_sheet else [])])
        for name in _FLOATS:
            out[name] = out[name].astype(np.float32)
        for name in ("largest_cluster", "train_matches"):
            out[name] = out[name].astype("Int32")
        return out

    def _confirm_chunk(self, chunk: list[str], results: list[dict[str, Any] | None], offset: int) -> int:
        """Generate, embed and decide `chunk`; the prompts done (0: out of memory, batch halved, retry)."""
        import torch

        settings = self.settings
        try:
            images = generate_images(self.model, chunk, k=settings.k, seed=settings.seed, steps=settings.steps,
                                     guidance=settings.guidance, batch_size=self.batch_size, pipeline=self.pipeline)
        except torch.OutOfMemoryError as exc:
            if self.batch_size > 1:
                self.batch_size = max(1, self.batch_size // 2)
                log.warning("out of memory generating; retrying with %d images per call", self.batch_size)
                _release_memory()
                return 0
            results[offset] = _failed(STATUS_OOM, one_line(exc, limit=300))
            return 1
        except Exception as exc:  # noqa: BLE001 - a failing prompt must not sink the others
            if len(chunk) > 1:
                for i, prompt in enumerate(chunk):
                    while self._confirm_chunk([prompt], results, offset + i) == 0:
                        pass  # out of memory: retried with half the batch until one image per call
                return len(chunk)
            results[offset] = _failed(STATUS_ERROR, one_line(exc, with_type=True, limit=300))
            return 1
        k, side = settings.k, images.shape[-1]
        vectors = self.embedder.embed(images.reshape(-1, 3, side, side)).reshape(len(chunk), k, -1)
        for i in range(len(chunk)):
            if not (np.isfinite(images[i]).all() and np.isfinite(vectors[i]).all()):
                results[offset + i] = _failed(STATUS_NONFINITE, "non-finite pixels or embeddings")
                continue
            row = prompt_evidence(vectors[i], self.embedder.metric, self.threshold, self.min_cluster,
                                  train_vectors=self.train_vectors,
                                  train_ids=None if self.train is None else self.train.ids)
            row.update(status=STATUS_OK, error=None)
            if settings.contact_sheet:
                from memscan.confirm.sheet import strip_png

                match = None
                if self.train is not None and row["train_id"] is not None:
                    match = self.train.get(self.train.ids.index(row["train_id"]))
                row["sheet_png"] = strip_png(images[i], match)
            results[offset + i] = row
        return len(chunk)


def vae_roundtrip(model: ScoringModel, images: np.ndarray) -> np.ndarray:
    """decode(encode(images)) with the model's VAE (posterior mean): the closest image the model can
    make at all. A generation is a VAE decode, so a copy differs from the raw training image by the
    VAE's reconstruction error too (on the demo: up to 0.12 RMS in pixels, more than a copy's spread)."""
    import torch

    vae = model.pipeline.vae
    param = next(vae.parameters())
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(param.device, param.dtype) * 2 - 1
        out = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((out.float().clamp(-1, 1) + 1) / 2).cpu().numpy()


def _failed(status: str, error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS[2:], None)
    for name in _FLOATS:
        row[name] = math.nan
    row.update(status=status, error=error)
    return row


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def label_counts(rows: pd.DataFrame) -> dict[str, int]:
    """Rows, labelled, memorized, not memorized, skipped and failed rows (a shard's stats, the summary)."""
    status = rows["status"]
    return {
        "rows": int(len(rows)),
        "ok": int((status == STATUS_OK).sum()),
        "skipped_empty": int((status == STATUS_SKIPPED_EMPTY).sum()),
        "failed_rows": int(((status != STATUS_OK) & (status != STATUS_SKIPPED_EMPTY)).sum()),
        "flagged": int((rows["label"] == MEMORIZED).sum()),
        "memorized": int((rows["label"] == MEMORIZED).sum()),
        "not_memorized": int((rows["label"] == NOT_MEMORIZED).sum()),
    }


def distance_gap(rows: pd.DataFrame, threshold: float) -> dict[str, float | int | None]:
    """The largest decision distance labelled memorized, the smallest labelled not, and how many
    prompts lie within a factor 2 of the threshold: where copies and the rest separate, the gap is
    wide and that count is 0; where it is not, those labels are the uncertain ones."""
    from memscan.confirm.sheet import decision_distance

    distance = decision_distance(rows)
    out: dict[str, float | int | None] = {}
    for name, label, pick in (("memorized_max", MEMORIZED, np.max), ("not_memorized_min", NOT_MEMORIZED, np.min)):
        values = distance[(rows["label"] == label).to_numpy() & np.isfinite(distance)]
        out[name] = round(float(pick(values)), 6) if len(values) else None
    out["near_threshold"] = int(((distance >= threshold / 2) & (distance < threshold * 2)).sum())
    return out


def load_confirm_model(settings: ConfirmSettings) -> ScoringModel:
    """The model `settings.detect` names, with its VAE."""
    from memscan.models.loading import load_model

    detect = settings.detect
    return load_model(detect.model, device=detect.device, dtype=detect.dtype, allow_pickle=detect.allow_pickle,
                      architecture=detect.architecture, with_vae=True, profile_overrides=detect.profile_overrides())


def file_output(output: str | Path) -> bool:
    """True for a labelled file (.csv, .parquet), False for a run directory; other suffixes refused."""
    from memscan.outputs import output_kind

    text = str(output)
    if Path(text).suffix.lower() in FILE_SUFFIXES and not text.endswith("/") and not Path(text).is_dir():
        return True
    try:
        return output_kind(output) == "file"
    except UsageError:
        raise UsageError(f"-o {output}: a labelled file ends in .csv or .parquet; a run directory is an existing "
                         "directory, a path ending in '/', or a name with no suffix") from None


def write_labels(rows: pd.DataFrame, path: Path, facts: dict[str, Any], *, store_prompt: bool = True) -> None:
    """A labelled file: Parquet (facts in its metadata, `sheet_png` kept) or CSV (no images)."""
    from memscan.io.scores import to_table, write_scores
    from memscan.outputs import atomic_write_bytes

    if path.suffix.lower() == ".csv":
        columns = [c for c in COLUMNS if store_prompt or c != "prompt"]
        atomic_write_bytes(path, lambda tmp: rows[columns].to_csv(tmp, index=False))
        return
    schema = output_schema(store_prompt=store_prompt, sheet="sheet_png" in rows)
    write_scores(to_table(rows, schema, facts), path)


@dataclass
class ConfirmResult:
    """The labelled rows, the summary, and where they were written."""

    rows: pd.DataFrame
    summary: dict[str, Any]
    output: Path | None
    contact_sheet: Path | None = None


def confirm(
    input_path: str | Path,
    output: str | Path | None = None,
    settings: ConfirmSettings | None = None,
    *,
    model: ScoringModel | None = None,
    if_exists: str = "fail",
    contact_sheet: str | Path | None = None,
    progress: Any | None = None,
) -> ConfirmResult:
    """Label every prompt of `input_path` from k generations and write the labelled file `output`.

    Outputs, settings, embedder and training images are checked, and the prompts read, before the
    model loads. `contact_sheet` (an .html path) also writes the page of generations."""
    from memscan.io.readers import PromptSource
    from memscan.outputs import check_distinct, check_output

    settings = settings or ConfirmSettings()
    if contact_sheet is not None:
        settings = replace(settings, contact_sheet=True)
    inputs = [input_path, *([Path(settings.train_images)] if settings.train_images else [])]
    output_path = location(output) if output is not None else None
    if output_path is not None:
        if not file_output(output_path):
            raise UsageError(f"-o {output}: confirm() writes one file; run directories are run_confirm's")
        check_output(output_path, inputs=inputs, if_exists=if_exists)
    if contact_sheet is not None:
        check_distinct({"-o": output_path, "--contact-sheet": contact_sheet})
        check_output(contact_sheet, inputs=inputs, if_exists=if_exists, what="contact sheet")
    settings = settings.resolved()
    detect = settings.detect
    frame = PromptSource(input_path, prompt_column=detect.prompt_column, id_column=detect.id_column).read()
    if frame.empty:
        raise InputError(f"{input_path}: no prompts (the file has no rows)")
    started = time.perf_counter()
    if progress is not None:
        progress.start(f"confirming {len(frame)} rows of {input_path} with model {detect.model} (k {settings.k}, "
                       f"embedder {settings.embedder}) -> {output_path or 'no file'}", total=len(frame))
    try:
        loaded = model if model is not None else load_confirm_model(settings)
        confirmer = Confirmer(loaded, settings)
        if progress is not None and model is None:
            progress.model_loaded(detail=f"{loaded.device}, {str(loaded.dtype).removeprefix('torch.')}")
        rows = confirmer.confirm_frame(frame, progress=None if progress is None else progress.advance)
    except BaseException:
        if progress is not None:
            progress.close(final=False)
        raise
    if progress is not None:
        progress.close()
    facts = {**confirmer.facts(), "input": str(input_path)}
    if output_path is not None:
        write_labels(rows, output_path, facts, store_prompt=detect.store_prompt)
    sheet = None
    if contact_sheet is not None:
        from memscan.confirm.sheet import write_contact_sheet

        sheet = write_contact_sheet(rows, contact_sheet, threshold=confirmer.threshold, facts=_sheet_facts(facts))
    seconds = time.perf_counter() - started
    summary = {**label_counts(rows), "distance_gap": distance_gap(rows, confirmer.threshold),
               "threshold": confirmer.threshold, "embedder": settings.embedder,
               "metric": confirmer.embedder.metric, "k": settings.k, "min_cluster": confirmer.min_cluster,
               "seconds": round(seconds, 3), "output": str(output_path) if output_path else None,
               "contact_sheet": str(sheet) if sheet else None, "model": facts["model"]}
    return ConfirmResult(rows=rows, summary=summary, output=output_path, contact_sheet=sheet)


def _sheet_facts(facts: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "source", "embedder", "metric", "threshold", "k", "min_cluster", "seed", "steps", "guidance",
            "train_images", "memscan_version")
    return {k: facts.get(k) for k in keys}
