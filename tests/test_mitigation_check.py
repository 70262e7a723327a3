"""The demo check: attribute reader, embedding generation seeded like text, summary numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from memscan.errors import EXIT_INPUT, UsageError
from memscan.mitigation.attributes import ATTRIBUTES, AttributeReader, agreement, decoded_renders
from memscan.mitigation.check import CheckSettings, generate_from_embeddings, summarize_check


def test_reader_reads_renders_through_a_decoder() -> None:
    """Calibrated on blurred renders, the reader reads blurred renders it has not seen."""

    def blur(images: np.ndarray) -> np.ndarray:  # a crude stand-in for a VAE round trip
        padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
        return sum(padded[:, :, 1 + dy : 33 + dy, 1 + dx : 33 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9

    reader = AttributeReader.calibrated(blur, n=600, seed=0)
    images, attrs = decoded_renders(blur, n=100, seed=1)
    accuracy = reader.accuracy(images, attrs)
    assert set(accuracy) == set(ATTRIBUTES)
    assert accuracy["colour"] > 0.6 and accuracy["size"] > 0.9 and accuracy["shape"] > 0.4  # chance: 0.1, 0.5, 0.17
    read = reader.read(images[:3])
    assert [r["size"] for r in read] == [a.size for a in attrs[:3]]


def test_readable_keeps_what_the_reader_reads_on_round_trips() -> None:
    """Accuracy is measured per object size, and an attribute is checked only where it is read well."""
    reader = AttributeReader.calibrated(None, n=600, seed=0)
    images, attrs = decoded_renders(None, n=300, seed=1)
    by_size = reader.accuracy_by_size(images, attrs)
    assert set(by_size) == {"small", "large"}
    everything = reader.readable(images, attrs, min_accuracy=0.0)
    assert everything == {"small": ATTRIBUTES, "large": ATTRIBUTES}
    cut = (by_size["small"]["shape"] + by_size["large"]["shape"]) / 2
    assert by_size["small"]["shape"] < cut < by_size["large"]["shape"]  # small shapes are the harder read
    readable = reader.readable(images, attrs, min_accuracy=cut)
    assert "shape" not in readable["small"] and "shape" in readable["large"]
    assert reader.readable(images, attrs, min_accuracy=1.01) == {"small": (), "large": ()}


def test_agreement_counts_the_asked_attributes() -> None:
    read = {"shape": "circle", "colour": "red", "size": "small"}
    assert agreement(read, {"shape": "circle", "colour": "red", "size": "large"}) == pytest.approx(2 / 3)
    assert agreement(read, {"shape": "square", "colour": "red", "size": None}) == 0.5
    assert np.isnan(agreement(read, {}))
    assert agreement(read, {"shape": "square", "colour": "red", "size": "small"}, ("colour", "size")) == 1.0


def test_embedding_generation_matches_text_generation() -> None:
    """The text encoder's own embedding of a prompt gives the very images its text gives."""
    from memscan.demo.verify import generate
    from memscan.models.builders import build_tiny_pipeline
    from memscan.models.loading import scoring_model_from_pipeline
    from memscan.models.profiles import ModelProfile
    from memscan.models.text import encode_prompts

    pipe = build_tiny_pipeline(seed=0, with_vae=True)
    model = scoring_model_from_pipeline(pipe, ModelProfile(name="tiny", source="tiny", resolution=64))
    prompts = ["a red circle", "the gilded owl of harrowgate", "a blue square"]
    settings = CheckSettings(n_per_prompt=2, batch_size=4, steps=2)
    texts = generate(pipe, prompts, 2, 0, batch_size=4, steps=2)
    with torch.no_grad():
        embeds = encode_prompts(model, prompts)
    images = generate_from_embeddings(pipe, embeds, settings)
    assert images.shape == texts.shape == (3, 2, 3, 64, 64)
    np.testing.assert_allclose(images, texts, atol=1e-5)


def test_summary_counts() -> None:
    table = pd.DataFrame({
        "status": ["ok", "ok", "unresolved", "not_flagged"],
        "score_after": [0.1, 0.2, 0.9, 0.3],
        "similarity": [0.9, 0.8, 0.95, 1.0],
        "copy_before": [1.0, 0.75, 1.0, 0.0],
        "copy_after": [0.0, 0.75, 1.0, 0.0],
        "agree_before": [1.0, 1.0, 1.0, 0.5],
        "agree_after": [0.5, 1.0, 1.0, 0.5],
    })
    non = pd.DataFrame({"status": ["not_flagged", "ok"], "prompt": ["a", "b"], "rewritten": ["a", "c"]})
    out = summarize_check(table, non, target=0.5)
    assert out["memorized_flagged"] == 3 and out["rewrite_success_rate_of_flagged"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["memorized_under_target_after"] == 0.75
    assert out["ok_prompts_no_longer_copying"] == 0.5
    assert out["similarity_of_ok"]["mean"] == pytest.approx(0.85)
    assert out["ok_attribute_agreement_ratio"] == 0.75
    assert out["not_memorized_unchanged"] == 0.5
    assert "description_only_attribute_agreement" not in out
    table["copy_description"], table["agree_description"] = [0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 1.0, 1.0]
    out = summarize_check(table, non, target=0.5)
    assert out["description_only_no_longer_copying"] == 0.5  # of the two ok rows
    assert out["description_only_attribute_agreement"] == 0.5
    assert "attribute_agreement_ratios_all_attributes" not in out
    table["agree_before_all"], table["agree_after_all"] = [0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 1.0, 1.0]
    out = summarize_check(table, non, target=0.5)
    assert out["attribute_agreement_ratios_all_attributes"] == {"ok": 0.75}  # (0.25 + 0.5) / (0.5 + 0.5)
    table["embedding_score"], table["embedding_score_verified"] = [0.1, 0.6, 0.2, np.nan], [0.2, 0.1, 0.7, np.nan]
    table["embedding_copy"], table["embedding_agree"] = [0.0, 0.0, 1.0, np.nan], [1.0, 0.5, 1.0, np.nan]
    out = summarize_check(table, non, target=0.5)
    assert out["embedding_under_target_of_flagged"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["embedding_verified_under_target_of_flagged"] == pytest.approx(1 / 3, abs=1e-4)  # 0.7 is not
    assert out["embedding_prompts_no_longer_copying"] == pytest.approx(2 / 3, abs=1e-4)
    assert "embedding_first_only_prompts_no_longer_copying" not in out  # no late embeddings
    table["embedding_first_only_copy"] = [1.0, 0.0, 1.0, np.nan]
    out = summarize_check(table, non, target=0.5)
    assert out["embedding_first_only_prompts_no_longer_copying"] == pytest.approx(1 / 3, abs=1e-4)
    assert out["description_only_attribute_agreement_ratio"] == 0.5


@pytest.mark.slow
def test_check_on_the_shipped_demo_model(tmp_path) -> None:
    """mitigate then check, end to end, on two memorized prompts and a clean one (about 30 s)."""
    from memscan.mitigation import MitigateSettings, mitigate
    from memscan.mitigation.check import check_mitigation
    from memscan.paths import demo_dir

    if not (demo_dir() / "model" / "model_index.json").is_file():
        pytest.skip("demo model not built")
    prompts = pd.read_csv(demo_dir() / "prompts.csv", keep_default_na=False)
    memorized = prompts["label"] == "memorized"
    sample = pd.concat([prompts[memorized].iloc[[0, 30]], prompts[~memorized].head(1)])
    sample.to_csv(tmp_path / "p.csv", index=False)
    settings = MitigateSettings(max_edits=2, n_triggers=3, emit_embeddings=tmp_path / "e.safetensors",
                                embedding_late=0.6, generation_steps=5)
    mitigate(tmp_path / "p.csv", tmp_path / "m.parquet", settings)
    table, summary = check_mitigation(
        tmp_path / "m.parquet", "demo", CheckSettings(n_per_prompt=1, steps=5, reader_renders=300),
        embeddings=tmp_path / "e.safetensors",
    )
    assert len(table) == 2 and summary["memorized"] == 2 and summary["not_memorized"] == 1
    assert table[["copy_before", "copy_after", "agree_before", "embedding_copy",
                  "embedding_first_only_copy"]].notna().all().all()
    assert "embedding_first_only_prompts_no_longer_copying" in summary
    with pytest.raises(UsageError, match="made for 5 steps"):  # late embeddings hold for their own generation
        check_mitigation(tmp_path / "m.parquet", "demo", CheckSettings(n_per_prompt=1, steps=6, reader_renders=300),
                         embeddings=tmp_path / "e.safetensors")
    assert set(summary["reader_accuracy_on_decoded_renders"]) == set(ATTRIBUTES)


def test_check_without_memorized_rows_is_a_one_line_error(tmp_path, capsys) -> None:
    """Labels that match no row (e.g. prompts of another data seed) fail before any model is loaded."""
    from memscan.io.scores import to_table, write_scores
    from memscan.mitigation.check import main
    from memscan.mitigation.table import output_schema

    rows = pd.DataFrame({"prompt_id": ["a"], "prompt": ["a red circle"], "rewritten": ["a red circle"],
                         "score_before": [0.1], "score_after": [0.1], "score_verified": [np.nan],
                         "similarity": [1.0], "trigger_tokens": [[]], "edits": [[]], "status": ["not_flagged"]})
    path = tmp_path / "m.parquet"
    write_scores(to_table(rows, output_schema(embeddings=False), {"target": 0.5}), path)
    assert main([str(path), "--model", "no/such/model"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no memorized demo prompt" in err and err.count("\n") == 1
