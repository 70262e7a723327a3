"""memscan.guard_check's pieces that need no demo run: the seeded subset, the similarities, the summary,
the table and the page."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from memscan.guard import PromptDecision
from memscan.guard_check import (
    GuardCheckSettings,
    _subset,
    embedding_cosine,
    generate_policy,
    html_page,
    prompt_similarities,
    summarize,
)
from memscan.mitigation.similarity import cosine_to, sentence_embeddings
from memscan.models.text import encode_prompts
from memscan.report import guard_markdown_table
from tests.test_guard import _pipe, _profile

SUMMARY = {
    "settings": {"n_per_prompt": 4}, "memorized": 2, "clean": 3, "images_per_prompt": 4,
    "policies": {
        "off": {"memorized_generation_copy_rate": 1.0, "attribute_agreement_ratio": 1.0, "clean_bit_identical": 3},
        "optimize": {"memorized_generation_copy_rate": 0.05, "attribute_agreement_ratio": 0.8,
                     "clean_bit_identical": 3},
        "block": {"memorized_generation_copy_rate": 0.0, "attribute_agreement_ratio": None, "clean_bit_identical": 3},
    },
}


def test_subset_is_seeded_and_keeps_the_input_order():
    prompts = pd.DataFrame({"prompt": [f"p{i}" for i in range(10)],
                            "label": ["memorized"] * 4 + ["not_memorized"] * 6})
    a = _subset(prompts, GuardCheckSettings(memorized=2, clean=3, subset_seed=1))
    b = _subset(prompts, GuardCheckSettings(memorized=2, clean=3, subset_seed=1))
    assert a.equals(b) and a["label"].value_counts().to_dict() == {"memorized": 2, "not_memorized": 3}
    assert a["prompt"].tolist() == sorted(a["prompt"], key=lambda p: int(p[1:]))
    assert len(_subset(prompts, GuardCheckSettings())) == 10


def test_table_and_page_show_every_policy_and_embed_the_plot():
    table = guard_markdown_table(SUMMARY).splitlines()
    assert len(table) == 2 + 3 and table[3].startswith("| optimize | ") and " 0.8 " in table[3]
    assert table[4].count(" - ") >= 1  # block: no agreement
    page = html_page(SUMMARY)
    assert page.count("data:image/png;base64,") == 1 and "<td>optimize</td>" in page


def test_embedding_cosine_is_one_unchanged_ignores_bos_and_drops_as_the_embedding_moves():
    start = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
    assert embedding_cosine(start, start.clone()) == pytest.approx(1.0, abs=1e-12)
    moved_bos = start.clone()
    moved_bos[:, 0] += 100.0  # the optimiser keeps BOS; the cosine reads the positions after it
    assert embedding_cosine(start, moved_bos) == pytest.approx(1.0, abs=1e-12)
    rest = start.clone()
    noise = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    cosines = []
    for _ in range(3):  # a fake optimisation: steps away from the start
        rest[:, 1:] += 0.5 * noise[:, 1:]
        cosines.append(embedding_cosine(start, rest))
    assert 1.0 > cosines[0] > cosines[1] > cosines[2] > 0.0
    a, b = start[:, 1:].flatten().double(), rest[:, 1:].flatten().double()
    assert cosines[2] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-12)  # flattened, not per token


def _decision(i: int, prompt: str, **fields: object) -> PromptDecision:
    base = {"index": i, "prompt": prompt, "score_before": 1.0, "sample_scores": [1.0], "norm": 1.0,
            "alignment": 0.0, "flagged": True, "action": "none", "generated": True, "prompt_used": prompt}
    return PromptDecision(**{**base, **fields})


def test_prompt_similarities_per_kind_of_decision(tiny_model):
    texts = ["a photo of a cat", "the mona lisa", "a red square", "a blue circle"]
    start = encode_prompts(tiny_model, [texts[2]])
    moved = start.clone()
    moved[:, 1:] += 0.3 * torch.randn(moved[:, 1:].shape, generator=torch.Generator().manual_seed(0))
    decisions = [
        _decision(0, texts[0], flagged=False),  # left alone
        _decision(1, texts[1], action="rewrite", prompt_used="the famous painting"),
        _decision(2, texts[2], action="optimize", prompt_used=None, embedding=moved.cpu()),
        _decision(3, texts[3], action="block", generated=False, prompt_used=None),
    ]
    got = prompt_similarities(tiny_model, decisions)
    assert got[0] == 1.0 and got[3] is None
    pooled = sentence_embeddings(tiny_model, [texts[1], "the famous painting"], "pooled")  # the tiny profile's
    assert got[1] == pytest.approx(float(cosine_to(pooled[0], pooled[1:])[0]), abs=1e-6) and got[1] < 0.9999
    assert got[2] == pytest.approx(embedding_cosine(start, moved), abs=1e-9) and got[2] < 0.999
    unchanged = prompt_similarities(tiny_model, [_decision(0, texts[2], action="optimize", prompt_used=None,
                                                           embedding=start.cpu())])
    assert unchanged[0] == pytest.approx(1.0, abs=1e-9)


def test_generate_policy_records_the_similarity_of_each_prompt():
    pipe = _pipe()
    texts = ["a photo of a cat", "a red square on a blue background", "the mona lisa"]
    settings = GuardCheckSettings(n_per_prompt=2, batch_prompts=2, steps=2)
    side = pipe.unet.config.sample_size
    latents = torch.randn((6, pipe.unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(0))
    warn = generate_policy(pipe, "warn", texts, latents, settings, {"threshold": 1e9}, profile=_profile())
    assert not warn["decisions"]["flagged"].any() and warn["decisions"]["similarity"].tolist() == [1.0] * 3
    scores = warn["decisions"]["score_before"].to_numpy()
    top = int(np.argmax(scores))
    kwargs = {"threshold": float(np.sort(scores)[-2]) + 1e-3, "target": float(scores[top]) - 0.2, "verify_noise": 0}
    opt = generate_policy(pipe, "optimize", texts, latents, settings, kwargs, profile=_profile())
    flagged = opt["decisions"]["flagged"].to_numpy()
    sims = opt["decisions"]["similarity"].to_numpy(float)
    assert flagged.tolist() == [i == top for i in range(3)]
    assert (sims[~flagged] == 1.0).all() and -1.0 <= sims[top] < 0.9999  # the embedding moved
    assert np.isfinite(opt["images"]).all() and opt["images"].shape[:2] == (3, 2)


def _table(similarity: dict[str, list[float | None]]) -> pd.DataFrame:
    """A guard check table of 2 memorized and 2 clean prompts, every policy generating all but block."""
    table = pd.DataFrame({"prompt": list("abcd"), "label": ["memorized"] * 2 + ["not_memorized"] * 2})
    for policy, sims in similarity.items():
        blocked = policy == "block"
        generated = [not blocked, not blocked, True, True]
        table[f"{policy}:flagged"] = [policy != "off", policy != "off", False, False]
        table[f"{policy}:generated"] = generated
        table[f"{policy}:copy"] = [1.0, 1.0, 0.0, 0.0] if policy in ("off", "warn") else [0.0, 0.25, 0.0, 0.0]
        table[f"{policy}:agree"] = [0.9, 0.7, np.nan, np.nan] if not blocked else [np.nan] * 4
        table[f"{policy}:agree_all"] = table[f"{policy}:agree"]
        table[f"{policy}:similarity"] = sims
        table[f"{policy}:identical"] = [policy == "off"] * 2 + [True, True]
    return table


def test_summary_has_a_similarity_per_policy():
    policies = ("off", "warn", "optimize", "rewrite", "block")
    table = _table({"off": [1.0] * 4, "warn": [1.0] * 4, "optimize": [0.5, 0.7, 1.0, 1.0],
                    "rewrite": [0.8, 0.9, 1.0, 1.0], "block": [None, None, 1.0, 1.0]})
    seconds = {p: (8.0, 1.0) for p in policies}
    summary = summarize(table, seconds, GuardCheckSettings(n_per_prompt=2, policies=policies), text_similarity="judge")
    rows = summary["policies"]
    assert summary["text_similarity"] == "judge" and list(rows) == list(policies)
    assert rows["warn"]["memorized_similarity"] == 1.0 and rows["warn"]["clean_similarity"] == 1.0
    assert rows["warn"]["similarity_measure"] == "same prompt" and rows["warn"]["memorized_flagged"] == 2
    assert rows["optimize"]["similarity_measure"] == "embedding cosine"
    assert rows["optimize"]["memorized_similarity"] == 0.6 and rows["optimize"]["memorized_similarity_min"] == 0.5
    assert rows["rewrite"]["similarity_measure"] == "text (judge)" and rows["rewrite"]["memorized_similarity"] == 0.85
    assert rows["block"]["similarity_measure"] is None and rows["block"]["memorized_similarity"] is None
    assert rows["block"]["memorized_similarity_min"] is None and rows["block"]["clean_similarity"] == 1.0
    # the numbers that were there before
    assert rows["optimize"]["memorized_generation_copy_rate"] == 0.125 and rows["optimize"]["seconds_per_image"] == 1.0
    assert rows["optimize"]["stopped_copying_of_copying_unguarded"] == 1.0
    assert rows["optimize"]["attribute_agreement_ratio"] == 1.0 and rows["block"]["attribute_agreement_ratio"] is None
    assert rows["warn"]["clean_bit_identical"] == 2 and rows["warn"]["clean_unflagged_bit_identical"] == "2/2"
    assert rows["optimize"]["guard_seconds_per_image"] == 0.125


def test_check_settings_pass_the_mitigation_target_and_budget_to_the_guard():
    from memscan.guard_check import GuardCheckSettings

    assert GuardCheckSettings().guard_kwargs() == {"optimize_steps": 50, "optimize_depth": 0.0, "optimize_late": None}
    assert GuardCheckSettings(target=0.23, optimize_steps=80, optimize_depth=0.5,
                              optimize_late=0.6).guard_kwargs() == {
        "optimize_steps": 80, "optimize_depth": 0.5, "optimize_late": 0.6, "target": 0.23}
