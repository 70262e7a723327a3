"""Issue 11 item 1: sd-v2 and realistic-vision scores before (unscaled norm) and after (the profile)
against the reference transcription of tests/test_reference_profiles.py, on tiny random models, CPU.

    OMP_NUM_THREADS=1 python benchmarks/reference_profiles.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import tiny_scoring_model  # noqa: E402
from test_reference_profiles import REFERENCE_BRANCH, _profile_model, reference_score  # noqa: E402

from memscan.methods import method_for  # noqa: E402
from memscan.models.loading import scoring_model_from_pipeline  # noqa: E402
from memscan.scorer import Scorer  # noqa: E402

torch.set_num_threads(1)
lines = [line for name in ("sd1_mem.txt", "sd1_nmem.txt")
         for line in (ROOT / "data" / "benchmark" / name).read_text().splitlines()[:20]]
for name, kind in (("sd-v2", "v_prediction"), ("realistic-vision", "epsilon")):
    base = tiny_scoring_model(kind, seed=1 if kind == "v_prediction" else 0)
    new = _profile_model(name, base)
    old = scoring_model_from_pipeline(base.pipeline, new.profile.with_overrides(norm_scale="none"))
    p = new.profile
    for label, model in (("before (norm_scale none)", old), ("after (profile)", new)):
        scorer = Scorer(model, method_for("anisotropy", model.profile), n_noise=1, batch_size=8)
        cols = scorer.score_texts(lines).columns
        ref = [reference_score(model, t, scorer.noise, REFERENCE_BRANCH[name], p.w_norm, p.w_align) for t in lines]
        # reference norm alone: score with weights (1, 0)
        ref_norm = [reference_score(model, t, scorer.noise, REFERENCE_BRANCH[name], 1.0, 0.0) for t in lines]
        ratio = float(torch.tensor(cols["norm"]).double().div(torch.tensor(ref_norm)).mean())
        diff = float((torch.tensor(cols["score"]).double() - torch.tensor(ref)).abs().max())
        rho = spearmanr(cols["score"], ref).statistic
        print(f"{name:17s} {label:25s} norm/ref_norm {ratio:8.4f}  max|score-ref| {diff:.3g}  "
              f"Spearman {rho:.4f}  (40 prompts, tiny {kind} model)")
