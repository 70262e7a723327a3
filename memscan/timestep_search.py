"""Which DDIM steps to read the anisotropy terms at: chosen from labels, for models unlike SD 1.x.

The paper reads the norm at the first step (t_hi, index 0) and the alignment near the end (t_lo,
index -3), both on the same pure-noise latent. On SD those steps carry the signal; on a model of
another make they may not. On memscan's second test model (valid-v: v-prediction, another image
world) the norm at index 0 separates memorized from clean prompts at AUC 0.74, while the same norm
read at index 25 (t = 481, still on the pure-noise latent) separates them at AUC 1.0; on the demo
every index gives AUC 1.0. The steps are a property of the model, like the weights, so
`memscan calibrate --search-timesteps` measures both terms at a grid of step indices on the
labelled prompts (`term_columns`: one UNet evaluation per prompt, noise and index, on the same
noise bank `detect` uses) and picks the pair on the calibration side only (`choose_pair`): the
profile's own pair stays unless another is better by more than a rounding tolerance, so a model
the paper's steps suit keeps the paper's score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from memscan.models.profiles import NormScale, VConvention

if TYPE_CHECKING:
    import torch

    from memscan.models.loading import ScoringModel

# Step indices of the 50-step schedule the search reads (0 = the first step, t_hi of the paper;
# 47 = index -3, its t_lo): every fifth step, and the paper's two.
DEFAULT_GRID = (0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 47)


def grid_for(steps: int) -> tuple[int, ...]:
    """DEFAULT_GRID for a schedule of `steps` DDIM steps: every tenth of it, and indices 0 and -3."""
    if steps == 50:
        return DEFAULT_GRID
    return tuple(sorted({min(round(k * steps / 10), steps - 1) for k in range(10)} | {0, max(steps - 3, 0)}))
NORM_PREFIX, ALIGN_PREFIX = "norm_t", "alignment_t"


def term_columns(
    model: ScoringModel, prompts: Sequence[str], *, indices: Sequence[int] | None = None, n_noise: int = 1,
    seed: int = 51, steps: int = 50, v_convention: VConvention = "epsilon", norm_scale: NormScale = "none",
    batch_size: int = 16,
) -> pd.DataFrame:
    """Per prompt (rows in order), the norm and the alignment read at each step index of `indices`
    (columns `norm_t{i}`, `alignment_t{i}`): `memscan detect`'s terms on its noise bank, as if t_hi
    and t_lo were that step (so the profile's own pair reproduces its `norm` and `alignment`)."""
    import torch

    from memscan.methods.anisotropy import channel_cosine, norm_scale_factor, unet_prediction
    from memscan.models.noise import noise_bank
    from memscan.models.text import encode_prompts

    indices = grid_for(steps) if indices is None else indices
    model.scheduler.set_timesteps(steps)
    timesteps = [int(model.scheduler.timesteps[i]) for i in indices]
    noise = noise_bank(n_noise, model.latent_shape, seed, device=model.device, dtype=model.dtype)
    unique = list(dict.fromkeys(str(p) for p in prompts))
    columns: dict[str, list[torch.Tensor]] = {f"{p}{i}": [] for i in indices for p in (NORM_PREFIX, ALIGN_PREFIX)}
    with torch.no_grad():
        empty = encode_prompts(model, [""]).expand(n_noise, -1, -1)
        uncond = [unet_prediction(model, noise, _column(t, n_noise, model), empty, v_convention) for t in timesteps]
        for start in range(0, len(unique), batch_size):
            embeds = encode_prompts(model, unique[start : start + batch_size])
            rows = len(embeds)
            latents, hidden = noise.repeat(rows, 1, 1, 1), embeds.repeat_interleave(n_noise, dim=0)
            for index, t, u in zip(indices, timesteps, uncond, strict=True):
                cond = unet_prediction(model, latents, _column(t, rows * n_noise, model), hidden, v_convention)
                u_rows = u.repeat(rows, 1, 1, 1)
                guidance = cond - u_rows
                norm = norm_scale_factor(model, t, norm_scale) * guidance.flatten(1).norm(dim=1)
                columns[f"{NORM_PREFIX}{index}"].append(norm.view(rows, n_noise).mean(dim=1).cpu())
                columns[f"{ALIGN_PREFIX}{index}"].append(
                    channel_cosine(u_rows, guidance).view(rows, n_noise).mean(dim=1).cpu())
    table = pd.DataFrame({k: torch.cat(v).numpy().astype(np.float32) for k, v in columns.items()}, index=unique)
    return table.loc[[str(p) for p in prompts]].reset_index(drop=True)


def _column(t: int, rows: int, model: ScoringModel) -> torch.Tensor:
    import torch

    return torch.full((rows,), t, dtype=torch.long, device=model.device)


def searched_indices(frame: pd.DataFrame) -> list[int]:
    """The step indices `frame` has both term columns for (empty: no search)."""
    suffixes = (str(c)[len(NORM_PREFIX):] for c in frame.columns if str(c).startswith(NORM_PREFIX))
    found = {int(s) for s in suffixes if s.isdigit()}
    return sorted(i for i in found if f"{ALIGN_PREFIX}{i}" in frame)


@dataclass(frozen=True)
class PairChoice:
    """The chosen (t_hi, t_lo) step indices and how every pair did on the calibration side."""

    t_hi_index: int
    t_lo_index: int
    tpr: float  # the ROC's TPR at the target FPR, on the calibration side
    auc: float
    default_tpr: float
    default_auc: float
    candidates: int


def choose_pair(
    frame: pd.DataFrame, labels: np.ndarray, *, default: tuple[int, int], target_fpr: float, steps: int = 50,
) -> PairChoice:
    """The (t_hi, t_lo) index pair of the searched columns whose fitted score ranks `labels` best:
    highest ROC TPR at `target_fpr` ('below' convention), then AUC, both rounded (to 0.01 and
    0.001) so that only a real gain moves off the `default` pair (indices may be negative, as in
    profiles).

    Not the TPR at the threshold calibrate sets: on a few hundred clean prompts or families that
    threshold clears the largest clean score, so its TPR is decided by one clean outlier and the
    pair chosen by it fits that outlier (valid-v, 1,122 clean prompts, 5 group-aware splits: held-out
    AUC 0.941 in one split where the ROC rule held 1.000)."""
    from memscan.evaluate import combined, evaluate, fit_weights

    indices = searched_indices(frame)
    default = (default[0] % steps, default[1] % steps)
    if default[0] not in indices or default[1] not in indices:
        raise ValueError(f"the searched steps {indices} lack the profile's pair {default}")
    results: dict[tuple[int, int], tuple[float, float]] = {}
    for hi in indices:
        for lo in indices:
            norm, align = frame[f"{NORM_PREFIX}{hi}"].to_numpy(), frame[f"{ALIGN_PREFIX}{lo}"].to_numpy()
            scores = combined(norm, align, *fit_weights(norm, align, labels))
            ranking = evaluate(labels, scores, targets=(target_fpr,))
            results[(hi, lo)] = (ranking.point(target_fpr, "below").tpr, ranking.auc)

    def key(pair: tuple[int, int]) -> tuple[float, float, bool, int]:
        tpr, auc = results[pair]
        return (round(tpr, 2), round(auc, 3), pair == default, -abs(pair[0] - default[0]) - abs(pair[1] - default[1]))

    best = max(results, key=key)
    return PairChoice(best[0], best[1], *results[best], *results[default], candidates=len(results))
