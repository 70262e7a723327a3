"""Model profiles: the shipped TOML files parse and say what the method needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from memscan.errors import ConfigError
from memscan.models.profiles import available_profiles, load_profile, load_profile_file
from memscan.paths import config_dir


def test_shipped_profiles_parse() -> None:
    names = available_profiles()
    for name in ("sd-v1-4", "sd-v1-5", "sd-v2", "sd-v2-base", "realistic-vision"):
        assert name in names
    for name in names:
        profile = load_profile(name)
        assert profile.name == name and profile.source
        assert profile.num_inference_steps == 50 and (profile.t_hi_index, profile.t_lo_index) == (0, -3)


def test_family_settings() -> None:
    v1, v2, rv = load_profile("sd-v1-4"), load_profile("sd-v2"), load_profile("realistic-vision")
    assert (v1.source, v1.prediction_type, v1.resolution, v1.pad_token) == (
        "CompVis/stable-diffusion-v1-4", "epsilon", 512, "<|endoftext|>")
    assert (v1.w_norm, v1.w_align, v1.threshold) == (1.0, 2.0, None)
    assert (v2.prediction_type, v2.resolution, v2.pad_token, v2.v_convention) == ("v_prediction", 768, "!", "raw")
    assert (v2.w_norm, v2.w_align) == (1.0, 0.1)
    assert (rv.w_norm, rv.w_align) == (2.0, 1.0)
    # the reference's sd_ver != 1 branch for both of its other models (tests/test_reference_profiles.py)
    assert (v1.norm_scale, v2.norm_scale, rv.norm_scale) == ("none", "reference-v", "reference-v")


def test_profile_less_v_models_get_the_sd_v2_score() -> None:
    """A v-prediction folder without a profile takes sd-v2's weights AND the terms they were fitted on."""
    from memscan.models.profiles import default_profile_for

    v = default_profile_for("some/v-model", "v_prediction")
    sd2 = load_profile("sd-v2")
    assert (v.w_norm, v.w_align, v.v_convention, v.norm_scale) == (sd2.w_norm, sd2.w_align, "raw", "reference-v")
    eps = default_profile_for("some/eps-model")
    assert (eps.w_norm, eps.w_align, eps.norm_scale) == (1.0, 2.0, "none")


def test_unknown_profile_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="sd-v1-4"):
        load_profile("sd-v9")


def test_bad_profiles_are_config_errors(tmp_path: Path) -> None:
    cases = {
        "nosource.toml": 'prediction_type = "epsilon"\n',
        "typo.toml": 'source = "x/y"\nw_nrom = 1\n',
        "pred.toml": 'source = "x/y"\nprediction_type = "sample"\n',
        "similarity.toml": 'source = "x/y"\n[mitigation]\ntext_similarity = " "\n',
        "broken.toml": "source = \n",
        "scale.toml": 'source = "x/y"\n[scoring]\nnorm_scale = "snr"\n',
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError):
            load_profile_file(tmp_path / name)


def test_relative_source_resolves_against_the_profile(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('source = "./model"\n[scoring]\nthreshold = 1.5\n')
    profile = load_profile_file(tmp_path / "p.toml")
    assert profile.source == str(tmp_path / "model") and profile.threshold == 1.5


def test_mitigation_table_sets_the_text_similarity(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('source = "x/y"\n[mitigation]\ntext_similarity = "tokens"\n')
    assert load_profile_file(tmp_path / "p.toml").text_similarity == "tokens"
    assert load_profile("sd-v1-4").text_similarity == "pooled"
    assert load_profile("demo").text_similarity == str((config_dir() / "../data/demo/judge").resolve())
