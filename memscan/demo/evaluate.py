"""Detection numbers on the demo's labelled prompts.

`score_labelled` uses memscan's own scorer (`memscan.detect.score_prompts`) when it is
importable and falls back to `minimal_scores`, a direct transcription of method.md (norm of
eps_c - eps_u at t_hi = 981, per-pixel channel cosine of (eps_u, eps_c - eps_u) at t_lo = 41, both
on one shared x_T), used only while the project's scorer did not exist yet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC = P(score_pos > score_neg) + 0.5 P(tie)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """Wen et al.'s convention: the best TPR with a threshold whose FPR is strictly below `fpr`
    (for 330 negatives at 1%: at most 3 negatives above the threshold)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    neg_sorted = np.sort(neg)[::-1]
    k = int(np.ceil(fpr * len(neg))) - 1  # negatives allowed strictly above the threshold
    thr = neg_sorted[k] if k >= 0 else neg_sorted[0]
    if k < 0:
        return float((pos > neg_sorted[0]).mean())
    return float((pos > thr).mean())


@torch.no_grad()
def minimal_scores(pipe, prompts: list[str], n_noise: int = 1, seed: int = 51, batch_size: int = 64,
                   latent_size: int = 8) -> pd.DataFrame:
    """method.md's anisotropy ingredients, with the same x_T for every prompt."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    t_hi, t_lo = int(sched.timesteps[0]), int(sched.timesteps[-3])
    gen = torch.Generator().manual_seed(seed)
    noises = torch.randn((n_noise, 4, latent_size, latent_size), generator=gen)

    def encode(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    empty = encode([""])
    norms = np.zeros((len(prompts), n_noise))
    aligns = np.zeros((len(prompts), n_noise))
    for k in range(n_noise):
        x = noises[k:k + 1]
        u_hi = pipe.unet(x, t_hi, empty).sample
        u_lo = pipe.unet(x, t_lo, empty).sample
        for i in range(0, len(prompts), batch_size):
            emb = encode(prompts[i:i + batch_size])
            xb = x.expand(len(emb), -1, -1, -1)
            c_hi = pipe.unet(xb, t_hi, emb).sample
            c_lo = pipe.unet(xb, t_lo, emb).sample
            norms[i:i + len(emb), k] = (c_hi - u_hi).flatten(1).norm(dim=1).numpy()
            g = c_lo - u_lo
            cos = torch.nn.functional.cosine_similarity(u_lo.expand_as(g), g, dim=1)  # over channels
            aligns[i:i + len(emb), k] = cos.flatten(1).mean(dim=1).numpy()
    return pd.DataFrame({"norm": norms.mean(1), "alignment": aligns.mean(1)})


def score_labelled(model_dir: str, prompts: pd.DataFrame, n_noise: int = 1, seed: int = 51,
                   w_norm: float = 1.0, w_align: float = 1.0, use_memscan: bool = True) -> pd.DataFrame:
    """Scores of every labelled prompt, with the `scorer` used in a column."""
    prompt_list = prompts["prompt"].tolist()
    scores = None
    if use_memscan:
        try:
            from memscan.detect import score_prompts
            from memscan.models.loading import load_model
        except ImportError:
            score_prompts = None
        if score_prompts is not None:
            from memscan.models.profiles import load_profile

            # the demo profile's defaults (weights, timesteps, resolution), with this model folder
            profile = load_profile("demo").with_overrides(source=str(model_dir))
            model = load_model(profile)
            scores = score_prompts(prompt_list, model, n_noise=n_noise, seed=seed)
            scores = scores[["norm", "alignment", "score"]].reset_index(drop=True)
            scores["scorer"] = "memscan"
    if scores is None:
        from diffusers import StableDiffusionPipeline

        from memscan.models.loading import folder_tokenizer

        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False,
                                                       **folder_tokenizer(model_dir))
        latent = int(pipe.unet.config.sample_size)
        scores = minimal_scores(pipe, prompt_list, n_noise=n_noise, seed=seed, latent_size=latent)
        scores["score"] = w_norm * scores["norm"] + w_align * scores["alignment"]
        scores["scorer"] = "demo-minimal"
    return pd.concat([prompts.reset_index(drop=True), scores], axis=1)


def detection_report(scored: pd.DataFrame) -> dict:
    """AUC and TPR@1%FPR of score, norm and alignment, memorized vs not memorized.

    With memscan's evaluator (memscan.evaluate) both TPR conventions are reported: `below` (Wen et
    al.: last ROC point with FPR < 1%) and `closest` (the reference code: FPR closest to 1%)."""
    pos = scored["label"] == "memorized"
    report: dict = {"n_memorized": int(pos.sum()), "n_not_memorized": int((~pos).sum())}
    try:
        from memscan.evaluate import evaluate
    except ImportError:
        evaluate = None
    for col in ("score", "norm", "alignment"):
        if evaluate is not None:
            ev = evaluate(pos.astype(float).to_numpy(), scored[col].to_numpy(float), targets=(0.01,), name=col)
            report[f"auc_{col}"] = round(ev.auc, 4)
            report[f"tpr1_{col}"] = round(ev.point(0.01, "below").tpr, 4)
            # closest convention; among equally close ROC points the one with the highest TPR
            gap = np.abs(ev.roc_fpr - 0.01)
            report[f"tpr1_closest_{col}"] = round(float(ev.roc_tpr[gap == gap.min()].max()), 4)
        else:
            report[f"auc_{col}"] = round(auc(scored.loc[pos, col], scored.loc[~pos, col]), 4)
            report[f"tpr1_{col}"] = round(tpr_at_fpr(scored.loc[pos, col], scored.loc[~pos, col]), 4)
    for kind, grp in scored.groupby("kind"):
        report[f"mean_norm_{kind}"] = round(float(grp["norm"].mean()), 4)
        report[f"mean_align_{kind}"] = round(float(grp["alignment"].mean()), 4)
    return report


def score_model(model_dir: str | Path, *, seed: int = 0, prompts: str | Path | None = None, n: int = 1,
                score_seed: int = 51, minimal: bool = False, w_norm: float = 1.0, w_align: float = 1.0,
                out: str | Path | None = None) -> dict:
    """Score the labelled prompts (`prompts` csv, or rebuilt from data seed `seed`) with memscan's
    scorer (the demo profile's settings on `model_dir`), or with the demo's own `minimal_scores`
    (`minimal`, weights `w_norm`, `w_align`), and report detection. `out` (csv): the scored
    prompts. Returns {"scorer", "n", **detection_report}."""
    from memscan.demo.data import load_prompts
    from memscan.demo.verify import check_model_dir

    check_model_dir(model_dir)
    labelled = load_prompts(prompts, seed)
    scored = score_labelled(str(model_dir), labelled, n_noise=n, seed=score_seed, w_norm=w_norm,
                            w_align=w_align, use_memscan=not minimal)
    if out:
        scored.to_csv(out, index=False)
    return {"scorer": scored["scorer"].iloc[0], "n": n, **detection_report(scored)}
