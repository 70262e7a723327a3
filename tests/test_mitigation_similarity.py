"""Sentence vectors of the text encoder (the pooled EOS state, the mean of the token states) and of
a CLIP text model brought as a judge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memscan.errors import ModelError, ModelNotCachedError, UsageError
from memscan.mitigation import MitigateSettings
from memscan.mitigation.similarity import (
    cosine_to,
    pooled_embeddings,
    resolve_similarity,
    sentence_embeddings,
    text_judge,
)
from memscan.models.loading import ScoringModel
from memscan.models.text import tokenize

TEXTS = ["a red circle", "a large yellow square, the sapphire raven of harrowgate", "x"]


def test_pooled_is_the_encoders_pooler_output(tiny_model: ScoringModel) -> None:
    with torch.no_grad():
        pooled = tiny_model.text_encoder(tokenize(tiny_model, TEXTS).input_ids).pooler_output
    torch.testing.assert_close(pooled_embeddings(tiny_model, TEXTS), F.normalize(pooled, dim=-1))


def test_tokens_is_the_mean_state_of_the_prompts_tokens_after_bos(tiny_model: ScoringModel) -> None:
    tokens = tokenize(tiny_model, TEXTS)
    with torch.no_grad():
        states = tiny_model.text_encoder(tokens.input_ids).last_hidden_state
    expected = []
    for row, mask in zip(states, tokens.attention_mask, strict=True):
        length = int(mask.sum())  # BOS, the prompt's tokens, the first EOS
        expected.append(F.normalize(row[1:length].mean(0), dim=0))
    got = sentence_embeddings(tiny_model, TEXTS, "tokens", batch_size=2)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, sentence_embeddings(tiny_model, TEXTS, "pooled"))
    assert cosine_to(got[0], got)[0] == pytest.approx(1.0)


def test_an_unknown_similarity_is_a_model_that_does_not_load(
    tiny_model: ScoringModel, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelError, match="similarity model .*bleu"):
        sentence_embeddings(tiny_model, TEXTS, str(tmp_path / "bleu"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as a user without network sets it (else the hub retries)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotCachedError, match="similarity model 'nosuch/judge' is not in the local") as info:
        sentence_embeddings(tiny_model, TEXTS, "nosuch/judge")
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="--similarity"):
        MitigateSettings(similarity=" ")


def _save_judge(folder) -> torch.nn.Module:
    import shutil

    from memscan.demo.judge import JudgeConfig, build_text_tower
    from memscan.models.tokenizer import TOKENIZER_FILES
    from memscan.paths import tokenizer_dir

    torch.manual_seed(0)
    judge = build_text_tower(JudgeConfig(width=16, layers=1, heads=2)).eval()
    judge.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir() / name, folder / name)
    return judge


def test_a_clip_text_model_judges_in_place_of_the_encoder(tiny_model: ScoringModel, tmp_path) -> None:
    """Any other --similarity is a CLIP text model: its normalised projected text embedding."""
    from memscan.models.tokenizer import load_clip_tokenizer

    judge = _save_judge(tmp_path / "judge")
    tokens = load_clip_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(judge(**tokens).text_embeds, dim=-1)
    source = resolve_similarity(str(tmp_path / "judge"))
    got = sentence_embeddings(tiny_model, TEXTS, source, batch_size=2)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, expected)
    assert text_judge(source) is text_judge(source)  # loaded once per process
    assert resolve_similarity("tokens") == "tokens" and resolve_similarity("org/clip") == "org/clip"


def test_a_profile_names_its_judge_relative_to_itself(tmp_path) -> None:
    from memscan.models.profiles import load_profile_file

    profile = tmp_path / "m.toml"
    profile.write_text('source = "org/model"\n[mitigation]\ntext_similarity = "./judge"\n')
    assert load_profile_file(profile).text_similarity == str((tmp_path / "judge").resolve())
    profile.write_text('source = "org/model"\n[mitigation]\ntext_similarity = "tokens"\n')
    assert load_profile_file(profile).text_similarity == "tokens"


