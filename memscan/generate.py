"""`memscan generate`: images from a prompt file through the guard (memscan.guard), resumable.

    DIR/settings.json              what the directory was made with (a rerun with others is refused, exit 2)
    DIR/images/<id>-<k>.png        image k of a prompt (<id>: the prompt_id made file-safe)
    DIR/log/part-NNNNNN.parquet    the decisions of one batch (NNNNNN: its first row), written AFTER
                                   its PNGs: a prompt is done iff a log part holds its rows
    DIR/decisions.parquet          all log parts merged in input order, rewritten at the end of every run

Image k of the prompt in row r starts from `randn(Generator("cpu").manual_seed(seed + r * k_total + k))`
(the `seed` column), so an image does not depend on the batch it was made in or on a resume.
`--guard off` generates without scoring.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from memscan.errors import FingerprintMismatchError, UsageError
from memscan.guard import POLICIES

GUARD_CHOICES = (*POLICIES, "off")
LOG_COLUMNS = ("prompt_id", "prompt", "k", "seed", "score_before", "flagged", "action", "score_after",
               "score_verified", "resolved", "prompt_used", "reseed_seed", "image", "error")


@dataclass(frozen=True)
class GenerateSettings:
    """Everything that decides the images: a rerun must use the same (checked against settings.json)."""

    model: str = "demo"
    guard: str = "warn"
    threshold: float | None = None
    num_images_per_prompt: int = 1
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int = 8  # prompts per guarded pipeline call
    device: str = "auto"
    dtype: str = "auto"
    prompt_column: str | None = None
    id_column: str | None = None
    optimize_late: float | None = None  # --guard optimize: re-optimise at this share of the steps (Guard)

    def check(self) -> None:
        """One-line refusals of values that cannot work."""
        if self.guard not in GUARD_CHOICES:
            raise UsageError(f"--guard {self.guard!r}: use one of {', '.join(GUARD_CHOICES)}")
        if self.optimize_late is not None and (self.guard != "optimize" or not 0 < self.optimize_late < 1):
            raise UsageError(f"--optimize-late {self.optimize_late}: a share of the steps in (0, 1), "
                             "with --guard optimize")
        if self.num_images_per_prompt < 1 or self.steps < 1 or self.batch_size < 1:
            raise UsageError("--num-images-per-prompt, --steps and --batch-size must be >= 1")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the images or the log (device/dtype included: they change pixels)."""
        return dict(asdict(self))


@dataclass
class GenerateResult:
    """The merged decisions (one row per image) and the run's summary."""

    decisions: pd.DataFrame
    summary: dict[str, Any]


def safe_id(prompt_id: str) -> str:
    """`prompt_id` as a file-name stem: unsafe characters become '_' and a short hash keeps ids that
    differ only in those characters apart."""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", str(prompt_id))[:80]
    if text != str(prompt_id) or not text or text.startswith("."):
        text = f"{text}-{hashlib.sha1(str(prompt_id).encode()).hexdigest()[:8]}"
    return text


def check_generate_output(output: str | Path, input_path: str, settings: GenerateSettings) -> Path:
    """Before the model loads: DIR is not the input, can be written, and is new, empty, or a generate
    directory made with the same settings (else exit 2)."""
    from memscan.outputs import check_output

    out = Path(output)
    check_output(out, inputs=[input_path], if_exists="resume", kind="run", what="generate output")
    saved = out / "settings.json"
    if saved.is_file():
        before = json.loads(saved.read_text(encoding="utf-8"))
        mine = {"input": str(input_path), **settings.fingerprint()}
        differ = sorted(k for k in set(before) | set(mine) if before.get(k) != mine.get(k))
        if differ:
            changes = ", ".join(f"{k}: {before.get(k)!r} -> {mine.get(k)!r}" for k in differ)
            raise FingerprintMismatchError(f"{out} was made with other settings ({changes}); use another directory")
    elif out.is_dir() and any(out.iterdir()):
        raise UsageError(f"{out} exists, is not empty and is not a memscan generate directory (no settings.json)")
    return out


def _done_ids(log_dir: Path) -> set[str]:
    if not log_dir.is_dir():
        return set()
    done: set[str] = set()
    for part in sorted(log_dir.glob("part-*.parquet")):
        done.update(pd.read_parquet(part, columns=["prompt_id"])["prompt_id"].astype(str))
    return done


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    from memscan.outputs import atomic_write_bytes

    atomic_write_bytes(path, lambda tmp: frame.to_parquet(tmp, index=False))


def _latents(rows: list[int], k: int, seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """The initial latents of `rows` (k each, prompt-major) and their seeds."""
    seeds = [seed + r * k + j for r in rows for j in range(k)]
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
    return torch.stack(noise), seeds


def generate_images(
    input_path: str, output: str | Path, settings: GenerateSettings, *, progress: Any = None,
    pipeline: Any = None, profile: Any = None,
) -> GenerateResult:
    """Generate every prompt's images through the guard into `output` (see the module doc);
    prompts already logged there are skipped. `pipeline`/`profile`: use this loaded pipeline
    (tests, notebooks) instead of loading `settings.model`."""
    from memscan.io.readers import read_prompts

    settings.check()
    out = check_generate_output(output, input_path, settings)
    prompts = read_prompts(input_path, prompt_column=settings.prompt_column, id_column=settings.id_column)
    prompts = prompts.reset_index(drop=True)
    if pipeline is None and settings.guard != "off" and settings.threshold is None:
        _check_threshold(settings.model)
    ids = prompts["prompt_id"].astype(str)
    if ids.duplicated().any():
        raise UsageError(f"{input_path}: repeated prompt_id {ids[ids.duplicated()].iloc[0]!r}; ids name the images")
    log_dir, image_dir = out / "log", out / "images"
    done = _done_ids(log_dir)
    todo = [r for r in range(len(prompts)) if ids[r] not in done]
    k = settings.num_images_per_prompt
    if progress is not None:
        progress.done = len(prompts) - len(todo)
        progress.start(f"generating {len(prompts)} prompts x {k} images with {settings.model}, guard "
                       f"{settings.guard} -> {out} ({len(prompts) - len(todo)} done before)", total=len(prompts))
    began = time.perf_counter()
    if todo:
        pipe, profile = _pipeline(settings, pipeline, profile)
        if progress is not None:
            progress.model_loaded()
        guard = None
        if settings.guard != "off":
            from memscan.guard import Guard

            guard = Guard(pipe, profile, threshold=settings.threshold, policy=settings.guard,
                          optimize_late=settings.optimize_late)
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(
            json.dumps({"input": str(input_path), **settings.fingerprint()}, indent=2) + "\n", encoding="utf-8")
        image_dir.mkdir(exist_ok=True)
        log_dir.mkdir(exist_ok=True)
        side = int(profile.resolution)
        shape = (pipe.unet.config.in_channels, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor)
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            rows = _batch(pipe, guard, prompts, ids, batch, settings, shape, side, image_dir, out)
            _write_parquet(pd.DataFrame(rows, columns=list(LOG_COLUMNS)), log_dir / f"part-{batch[0]:06d}.parquet")
            if progress is not None:
                progress.advance(len(batch))
    if progress is not None:
        progress.close()
    parts = sorted(log_dir.glob("part-*.parquet")) if log_dir.is_dir() else []
    frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame(
        columns=list(LOG_COLUMNS))
    order = {pid: i for i, pid in enumerate(ids)}
    frame = frame.sort_values(["prompt_id", "k"], key=lambda c: c.map(order) if c.name == "prompt_id" else c,
                              kind="stable").reset_index(drop=True)
    if parts:
        _write_parquet(frame, out / "decisions.parquet")
    actions = frame.drop_duplicates("prompt_id")["action"].value_counts().to_dict() if len(frame) else {}
    summary = {
        "output": str(out), "prompts": len(prompts), "generated_now": len(todo),
        "skipped_done": len(prompts) - len(todo),
        "images": int(frame["image"].notna().sum()) if len(frame) else 0, "actions": actions,
        "errors": int(frame.drop_duplicates("prompt_id")["error"].notna().sum()) if len(frame) else 0,
        "seconds": round(time.perf_counter() - began, 3), "guard": settings.guard,
    }
    return GenerateResult(frame, summary)


def _check_threshold(spec: str) -> None:
    """Before the model loads: a guard needs a threshold, --threshold or the profile's calibrated one."""
    from memscan.errors import ConfigError
    from memscan.models.loading import resolve_profile

    profile = resolve_profile(spec)
    if profile.threshold is None or profile.calibration.get("method", "anisotropy") != "anisotropy":
        raise ConfigError(f"--guard needs a threshold: model {spec!r} (profile {profile.name!r}) has no calibrated "
                          "anisotropy threshold; pass --threshold")


def _pipeline(settings: GenerateSettings, pipeline: Any, profile: Any) -> tuple[Any, Any]:
    """The DDIM pipeline (with its VAE) and the profile to guard with."""
    if pipeline is not None:
        return pipeline, profile
    from memscan.confirm.generate import ddim_pipeline
    from memscan.models.loading import load_model

    model = load_model(settings.model, device=settings.device, dtype=settings.dtype, with_vae=True)
    return ddim_pipeline(model), model.profile


def _batch(
    pipe: Any, guard: Any, prompts: pd.DataFrame, ids: pd.Series, batch: list[int], settings: GenerateSettings,
    shape: tuple[int, ...], side: int, image_dir: Path, out: Path,
) -> list[dict[str, Any]]:
    """Generate one batch of prompts, write their PNGs, return their log rows."""
    from memscan.outputs import atomic_write_bytes

    k = settings.num_images_per_prompt
    rows: list[dict[str, Any]] = []
    live = [r for r in batch if str(prompts.at[r, "prompt"] or "").strip()]
    for r in batch:
        if r not in live:
            rows += [_row(ids[r], "", j, None, error="empty prompt") for j in range(k)]
    if not live:
        return rows
    device = pipe._execution_device
    latents, seeds = _latents(live, k, settings.seed, shape)
    latents = latents.to(device, pipe.unet.dtype)
    texts = [str(prompts.at[r, "prompt"]) for r in live]
    call = {"num_inference_steps": settings.steps, "guidance_scale": settings.guidance_scale, "height": side,
            "width": side}
    if guard is None:
        images = pipe(texts, num_images_per_prompt=k, latents=latents, **call).images
        decisions = [None] * len(live)
    else:
        result = guard(texts, num_images_per_prompt=k, latents=latents, **call)
        images, decisions = result.images, result.prompts
    for i, r in enumerate(live):
        d = decisions[i]
        for j in range(k):
            image = images[i * k + j]
            name = None
            if image is not None:
                name = f"images/{safe_id(ids[r])}-{j}.png"
                atomic_write_bytes(out / name, lambda tmp, im=image: im.save(tmp, format="PNG"))
            if d is None:
                rows.append(_row(ids[r], texts[i], j, seeds[i * k + j], action="off", prompt_used=texts[i],
                                 image=name))
            else:
                rows.append(_row(
                    ids[r], texts[i], j, seeds[i * k + j], score_before=d.sample_scores[j], flagged=d.flagged,
                    action=d.action, score_after=d.score_after, score_verified=d.score_verified, resolved=d.resolved,
                    prompt_used=d.prompt_used if d.embedding is None else "<optimized embedding>" if d.late_step is None
                    else f"<optimized embedding, optimized again from step {d.late_step}>",
                    reseed_seed=d.seed, image=name, error=d.error,
                ))
    return rows


def _row(prompt_id: str, prompt: str, k: int, seed: int | None, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(LOG_COLUMNS)
    row.update(prompt_id=str(prompt_id), prompt=prompt, k=k, seed=seed, **fields)
    return row
