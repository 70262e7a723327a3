"""memscan.guard_check's pieces that need no demo run: the seeded subset, the table and the page."""

from __future__ import annotations

import pandas as pd

from memscan.guard_check import GuardCheckSettings, _subset, html_page, markdown_table

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
    table = markdown_table(SUMMARY).splitlines()
    assert len(table) == 2 + 3 and table[3].startswith("| optimize | ") and " 0.8 " in table[3]
    assert table[4].count(" - ") >= 1  # block: no agreement
    page = html_page(SUMMARY)
    assert page.count("data:image/png;base64,") == 1 and "<td>optimize</td>" in page
