"""Scorer.score_frame: one output row per input row, statuses, truncation, flags."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from memscan.methods.anisotropy import AnisotropyMethod
from memscan.models.loading import ScoringModel
from memscan.scorer import Scorer


def _frame(prompts: list[str | None]) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt": prompts})


def test_every_input_row_gets_a_row_with_status(tiny_model: ScoringModel) -> None:
    long_prompt = " ".join(["memorized"] * 120)
    frame = _frame(["a cat", None, "", "   ", "a cat", long_prompt])
    out = Scorer(tiny_model, AnisotropyMethod()).score_frame(frame)
    assert out["prompt_id"].tolist() == frame["prompt_id"].tolist()
    assert out["status"].tolist() == ["ok", "skipped_empty", "skipped_empty", "skipped_empty", "ok", "ok"]
    assert out["error"].tolist()[:2] == [None, "empty prompt"]
    assert out["truncated"].tolist() == [False, False, False, False, False, True]
    assert np.isnan(out.loc[1:3, "score"]).all()
    assert out.loc[0, "score"] == out.loc[4, "score"]
    assert out["flagged"].isna().all()  # no threshold: unknown, not False


def test_threshold_sets_flagged(tiny_model: ScoringModel) -> None:
    frame = _frame(["a cat", "a red square", "the mona lisa", None])
    scores = Scorer(tiny_model, AnisotropyMethod()).score_frame(frame)["score"]
    cut = float(np.nanmedian(scores))
    out = Scorer(tiny_model, AnisotropyMethod(), threshold=cut).score_frame(frame)
    assert out["flagged"].tolist()[:3] == [s > cut for s in scores[:3]]
    assert pd.isna(out["flagged"].iloc[3])


def test_truncation_matches_the_pipeline(tiny_model: ScoringModel) -> None:
    """A prompt cut at 77 tokens scores like its first 75 tokens (BOS + 75 + EOS)."""
    words = [f"w{i}" for i in range(200)]
    scorer = Scorer(tiny_model, AnisotropyMethod())
    long_score = scorer.score_texts([" ".join(words)])
    ids = tiny_model.tokenizer(" ".join(words), truncation=True, max_length=77).input_ids
    head = tiny_model.tokenizer.decode(ids[1:-1])
    head_score = scorer.score_texts([head])
    assert long_score.truncated.tolist() == [True]
    assert head_score.truncated.tolist() == [False]
    assert long_score.columns["score"][0] == pytest.approx(head_score.columns["score"][0], abs=1e-6)


class _NanMethod(AnisotropyMethod):
    def score(self, model, state, noise, prompt_embeds):  # type: ignore[no-untyped-def]
        values = super().score(model, state, noise, prompt_embeds)
        values["score"] = torch.full_like(values["score"], float("nan"))
        return values


def test_non_finite_scores_get_their_own_status(tiny_model: ScoringModel) -> None:
    out = Scorer(tiny_model, _NanMethod()).score_frame(_frame(["a cat", None]))
    assert out["status"].tolist() == ["nonfinite", "skipped_empty"]
    assert out["error"].iloc[0] == "score is not finite"


def test_noise_bank_is_the_documented_convention(tiny_model: ScoringModel) -> None:
    scorer = Scorer(tiny_model, AnisotropyMethod(), n_noise=3, seed=51)
    expected = torch.randn((3, *tiny_model.latent_shape), generator=torch.Generator("cpu").manual_seed(51))
    torch.testing.assert_close(scorer.noise, expected, rtol=0, atol=0)
    assert tiny_model.latent_shape[0] == 4


class _FaultyMethod(AnisotropyMethod):
    """Injects faults: out-of-memory above `max_batch` prompts, and an error on one embedding."""

    def __init__(self, max_batch: int, poison_value: float | None = None) -> None:
        super().__init__()
        self.max_batch = max_batch
        self.poison_value = poison_value
        self.batches: list[int] = []

    def score(self, model, state, noise, prompt_embeds):  # type: ignore[no-untyped-def]
        self.batches.append(prompt_embeds.shape[0])
        if prompt_embeds.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.poison_value is not None and bool((prompt_embeds[:, 2, 0] == self.poison_value).any()):
            raise RuntimeError("boom\nwith a second line")
        return super().score(model, state, noise, prompt_embeds)


PROMPTS = ["a cat", "a dog", "a red square", "the mona lisa", "a tree", "a boat", "a car"]


def test_out_of_memory_halves_the_batch_and_completes(tiny_model: ScoringModel) -> None:
    clean = Scorer(tiny_model, AnisotropyMethod(), batch_size=8).score_frame(_frame(PROMPTS))
    faulty = _FaultyMethod(max_batch=2)
    scorer = Scorer(tiny_model, faulty, batch_size=8)
    out = scorer.score_frame(_frame(PROMPTS))
    assert out["status"].tolist() == ["ok"] * len(PROMPTS)
    np.testing.assert_allclose(out["score"], clean["score"], atol=1e-5)
    assert faulty.batches[:3] == [7, 4, 2] and scorer.batch_size == 2  # remembered


def test_out_of_memory_at_batch_one_marks_rows_oom(tiny_model: ScoringModel) -> None:
    out = Scorer(tiny_model, _FaultyMethod(max_batch=0), batch_size=4).score_frame(_frame(["a cat", None]))
    assert out["status"].tolist() == ["oom", "skipped_empty"]
    assert "out of memory" in out["error"].iloc[0] and np.isnan(out["score"].iloc[0])


def test_an_error_is_isolated_to_its_prompt(tiny_model: ScoringModel) -> None:
    from memscan.models.text import encode_prompts

    with torch.inference_mode():  # the hidden state of "boat" (position 2) identifies the prompt
        faulty = _FaultyMethod(max_batch=100, poison_value=encode_prompts(tiny_model, ["a boat"])[0, 2, 0].item())
    out = Scorer(tiny_model, faulty, batch_size=4).score_frame(_frame(PROMPTS))
    clean = Scorer(tiny_model, AnisotropyMethod()).score_frame(_frame(PROMPTS))
    bad = PROMPTS.index("a boat")
    assert out["status"].tolist() == ["ok" if i != bad else "error" for i in range(len(PROMPTS))]
    assert out["error"].iloc[bad] == "RuntimeError: boom with a second line"
    good = out["status"] == "ok"
    np.testing.assert_allclose(out["score"][good], clean["score"][good], atol=1e-5)


# ---------------------------------------------------------------- speed options (issue 15)

SPEED_PROMPTS = [f"a photo of thing number {i}" for i in range(11)] + ["a cat", "a photo of thing number 3"]


def _unet_rows(model: ScoringModel) -> tuple[list[int], object]:
    rows: list[int] = []
    handle = model.unet.register_forward_pre_hook(lambda module, args: rows.append(int(args[0].shape[0])))
    return rows, handle


def test_speed_options_are_off_on_cpu_by_default(tiny_model: ScoringModel) -> None:
    from memscan.models.device import is_compiled, on_cuda_by_default, uses_channels_last

    scorer = Scorer(tiny_model, AnisotropyMethod())
    assert scorer.prefetch is False and scorer.pad_batches is False
    assert not uses_channels_last(tiny_model.unet) and not is_compiled(tiny_model.unet)
    assert on_cuda_by_default(None, torch.device("cuda")) and not on_cuda_by_default(None, torch.device("cpu"))
    assert on_cuda_by_default(False, torch.device("cuda")) is False


def test_padding_the_last_batch_keeps_the_scores(tiny_model: ScoringModel) -> None:
    """What --compile does to shapes, with compile off: every UNet call of a batch has the same
    rows (the last batch filled with copies of its last prompt), and the padding is dropped."""
    plain = Scorer(tiny_model, AnisotropyMethod(), batch_size=5).score_texts(SPEED_PROMPTS)
    padded_scorer = Scorer(tiny_model, AnisotropyMethod(), batch_size=5)
    padded_scorer.pad_batches = True
    rows, handle = _unet_rows(tiny_model)
    try:
        padded = padded_scorer.score_texts(SPEED_PROMPTS)
    finally:
        handle.remove()  # type: ignore[attr-defined]
    assert rows == [2, 10, 10, 10]  # shared pass, then 12 unique prompts as 5 + 5 + 2 (padded to 5), 2 timesteps
    for name in plain.columns:
        np.testing.assert_allclose(padded.columns[name], plain.columns[name], rtol=0, atol=1e-6)
    assert padded.status.tolist() == ["ok"] * len(SPEED_PROMPTS)


def test_compiled_unet_traces_two_shapes_and_keeps_the_scores(tiny_model: ScoringModel) -> None:
    """torch.compile's front end (dynamo, graphs run eagerly): static shapes, the short last
    batch padded and the one-off shared pass eager, so a run traces one shape: the batch's."""
    from memscan.models.device import compile_unet, is_compiled, uncompile_unet

    shapes: list[tuple[int, ...]] = []

    def recorder(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        shapes.append(tuple(next(i for i in inputs if isinstance(i, torch.Tensor) and i.dim() == 4).shape))
        return graph.forward

    prompts = SPEED_PROMPTS[:7]
    plain = Scorer(tiny_model, AnisotropyMethod(), batch_size=4).score_texts(prompts)
    compile_unet(tiny_model.unet, backend=recorder)  # type: ignore[arg-type]
    try:
        scorer = Scorer(tiny_model, AnisotropyMethod(), batch_size=4)
        assert scorer.pad_batches  # a compiled UNet is padded for, whoever compiled it
        compiled = scorer.score_texts(prompts)
    finally:
        uncompile_unet(tiny_model.unet)
    assert not is_compiled(tiny_model.unet)
    assert [s[0] for s in shapes] == [8]  # 7 prompts in batches of 4 and 3 (padded to 4), 2 timesteps
    for name in plain.columns:
        np.testing.assert_allclose(compiled.columns[name], plain.columns[name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compile_flag_scores_equal_the_eager_fp32_path(tiny_model: ScoringModel) -> None:
    """--compile with inductor (minutes on a CPU): fp32 scores within the documented tolerance
    (1e-4 x max(1, |score|), benchmarks/README.md) of the eager path."""
    from memscan.models.device import is_compiled, uncompile_unet

    prompts = SPEED_PROMPTS[:3]
    plain = Scorer(tiny_model, AnisotropyMethod(), batch_size=2).score_texts(prompts)
    rows, handle = _unet_rows(tiny_model)
    try:
        scorer = Scorer(tiny_model, AnisotropyMethod(), batch_size=2, compile=True)
        assert is_compiled(tiny_model.unet) and scorer.pad_batches
        compiled = scorer.score_texts(prompts)
    finally:
        handle.remove()  # type: ignore[attr-defined]
        uncompile_unet(tiny_model.unet)
    assert rows == [2, 4, 4]  # the last batch (1 prompt) padded to 2
    tolerance = 1e-4 * max(1.0, float(np.max(np.abs(plain.columns["score"]))))
    for name in plain.columns:
        np.testing.assert_allclose(compiled.columns[name], plain.columns[name], rtol=0, atol=tolerance)


def test_prefetch_gives_bit_identical_scores(tiny_model: ScoringModel) -> None:
    """Text of the next batch encoded on a thread (and the next chunk tokenized on another):
    the same work in another order, so the same bits."""
    import threading

    threads: set[str] = set()
    lengths: set[int] = set()  # a tokenizer shared across threads once lost its padding: length 8, not 77

    def seen(module: torch.nn.Module, args: tuple) -> None:
        threads.add(threading.current_thread().name)
        lengths.add(int(args[0].shape[1]))

    handle = tiny_model.text_encoder.register_forward_pre_hook(seen)
    try:
        plain = Scorer(tiny_model, AnisotropyMethod(), batch_size=3, prefetch=False).score_texts(SPEED_PROMPTS, chunk=5)
        assert not any(name.startswith("memscan-text") for name in threads)
        for _ in range(3):  # races show up on some runs only
            fetched = Scorer(tiny_model, AnisotropyMethod(), batch_size=3, prefetch=True).score_texts(
                SPEED_PROMPTS, chunk=5
            )
            for name in plain.columns:
                np.testing.assert_array_equal(fetched.columns[name], plain.columns[name])
    finally:
        handle.remove()
    assert any(name.startswith("memscan-text") for name in threads)  # it did run ahead
    assert lengths == {77}
    for name in plain.columns:
        np.testing.assert_array_equal(fetched.columns[name], plain.columns[name])
    assert fetched.unique == plain.unique == 12
    assert fetched.status.tolist() == plain.status.tolist()
    assert fetched.truncated.tolist() == plain.truncated.tolist()


def test_prefetch_keeps_oom_halving_and_error_isolation(tiny_model: ScoringModel) -> None:
    from memscan.models.text import encode_prompts

    clean = Scorer(tiny_model, AnisotropyMethod(), batch_size=8).score_frame(_frame(PROMPTS))
    faulty = _FaultyMethod(max_batch=2)
    scorer = Scorer(tiny_model, faulty, batch_size=8, prefetch=True)
    out = scorer.score_frame(_frame(PROMPTS))
    assert out["status"].tolist() == ["ok"] * len(PROMPTS) and scorer.batch_size == 2
    np.testing.assert_allclose(out["score"], clean["score"], atol=1e-5)
    with torch.inference_mode():
        poison = encode_prompts(tiny_model, ["a boat"])[0, 2, 0].item()
    out = Scorer(tiny_model, _FaultyMethod(max_batch=100, poison_value=poison), batch_size=3,
                 prefetch=True).score_frame(_frame(PROMPTS))
    bad = PROMPTS.index("a boat")
    assert out["status"].tolist() == ["ok" if i != bad else "error" for i in range(len(PROMPTS))]
    good = out["status"] == "ok"
    np.testing.assert_allclose(out["score"][good], clean["score"][good], atol=1e-5)


def test_channels_last_keeps_fp32_scores(tiny_model: ScoringModel) -> None:
    from memscan.models.device import set_channels_last, uses_channels_last

    plain = Scorer(tiny_model, AnisotropyMethod(), batch_size=4).score_texts(SPEED_PROMPTS)
    try:
        scorer = Scorer(tiny_model, AnisotropyMethod(), batch_size=4, channels_last=True)
        assert uses_channels_last(tiny_model.unet)
        fast = scorer.score_texts(SPEED_PROMPTS)
        Scorer(tiny_model, AnisotropyMethod())  # None leaves the layout to whoever set it off CUDA
        assert uses_channels_last(tiny_model.unet)
        Scorer(tiny_model, AnisotropyMethod(), channels_last=False)
        assert not uses_channels_last(tiny_model.unet)
    finally:
        set_channels_last(tiny_model.unet, False)
    for name in plain.columns:
        np.testing.assert_allclose(fast.columns[name], plain.columns[name], rtol=0, atol=1e-5)


def test_text_encoder_runs_in_the_compute_dtype() -> None:
    """The text encoder is placed in the UNet's dtype (bf16 on CUDA by default, as the reference
    pipeline runs it); in fp32 on a CPU there is nothing to change."""
    from memscan.models.builders import build_tiny_pipeline
    from memscan.models.loading import scoring_model_from_pipeline
    from memscan.models.profiles import ModelProfile

    model = scoring_model_from_pipeline(
        build_tiny_pipeline(seed=0), ModelProfile(name="tiny", source="tiny", resolution=64), dtype=torch.bfloat16
    )
    assert next(model.text_encoder.parameters()).dtype == torch.bfloat16 == next(model.unet.parameters()).dtype


def test_detect_settings_pass_the_speed_options_to_the_scorer(tiny_model: ScoringModel) -> None:
    from memscan.config import DetectSettings, fingerprint
    from memscan.detect import build_scorer
    from memscan.models.device import is_compiled, set_channels_last, uncompile_unet, uses_channels_last

    settings = DetectSettings(batch_size=4, compile=True, prefetch=True, channels_last=True)
    try:
        scorer = build_scorer(settings, tiny_model)  # torch.compile is lazy: nothing compiles here
        assert is_compiled(tiny_model.unet) and scorer.pad_batches
        assert scorer.prefetch and uses_channels_last(tiny_model.unet) and scorer.batch_size == 4
    finally:
        uncompile_unet(tiny_model.unet)
        set_channels_last(tiny_model.unet, False)
    assert fingerprint(settings) == fingerprint(DetectSettings(batch_size=4))  # rounding only, like batch size
