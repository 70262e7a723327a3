"""Do the rewrites stop the copying and keep what the prompt asks for? Generate and look (demo model).

For every memorized demo prompt in a `mitigate` output, images are generated (the demo's own
`memscan.demo.verify.generate`: DDIM 50 steps, guidance 7.5, the same seeds for every variant)
from the original prompt, from its rewrite and, when given, from its optimised embedding. Then:

- copying: the demo's copy measure (`memscan.demo.verify`: pixel MSE to the prompt's training
  image under that image's calibrated cutoff, both through the VAE round trip, as `python -m
  memscan.demo verify` reports it); a prompt copies when most of its generations do;
- utility: the attributes a demo image can show (shape, colour, size) are read off each
  generation by a reader calibrated on the model's own decoder (`memscan.mitigation.attributes`;
  its accuracy on decoded renders is reported) and compared with what the prompt asks for: a
  memorized demo caption ("a large yellow square, the sapphire raven of harrowgate") names its
  training image's size, colour and shape. An attribute counts only where the reader reads it
  right on at least `min_reader_accuracy` of fresh round trips of objects of the asked size (no
  reader can check what the decoder cannot show: the shape of a small demo object); the
  agreement over all three attributes is reported beside it (`*_all`). The agreement of a
  rewrite's images is reported against that of the original prompt's images;
- the text similarity of the rewrites (from the `mitigate` output) and whether the prompts that
  are not memorized came back unchanged;
- a yardstick: the same numbers for the caption's description alone ("a large yellow square"),
  the rewrite a person who saw the image would write. Its attribute agreement is what this
  model's generations of a non-copying prompt reach at best.

Run it with `python -m memscan.mitigation.check MITIGATED.parquet --model demo`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from memscan.errors import InputError, MemscanError, UsageError, one_line
from memscan.io.scores import read_scores
from memscan.mitigation.attributes import (
    ATTRIBUTES,
    AttributeReader,
    agreement,
    decoded_renders,
    readable_attributes,
)
from memscan.mitigation.scenes import SceneReader
from memscan.mitigation.table import STATUS_NOT_FLAGGED, STATUS_OK, STATUS_UNRESOLVED

LABEL_COLUMNS = ("label", "kind", "train_image_id")


@dataclass(frozen=True)
class GenerationCheck:
    """What every check by generation shares (this one and memscan.guard_check): images per
    prompt, the seeds that make it repeatable, DDIM steps, guidance, the reader's calibration."""

    n_per_prompt: int = 4
    gen_seed: int = 0
    data_seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    reader_renders: int = 4000
    reader_holdout: int = 1000  # fresh round trips that measure the reader, attribute by size
    min_reader_accuracy: float = 0.8  # an attribute is checked where the reader is at least this right


@dataclass(frozen=True)
class CheckSettings(GenerationCheck):
    """The mitigation check's settings: the shared ones, and images per pipeline call."""

    batch_size: int = 64


@torch.no_grad()
def generate_from_embeddings(
    pipe: Any, embeds: torch.Tensor, settings: CheckSettings, late: torch.Tensor | None = None, late_index: int = 0,
) -> np.ndarray:
    """(P, n, 3, H, W) images from (P, 77, hidden) prompt embeddings, seeded batch by batch exactly
    as `memscan.demo.verify.generate` seeds text prompts, so both see the same initial noise; with
    `late` (P, 77, hidden), those from step `late_index` on (`memscan.mitigation.late.late_callback`)."""
    from memscan.mitigation.late import late_callback

    n = settings.n_per_prompt
    expanded = embeds.repeat_interleave(n, dim=0)
    late_rows = None if late is None else late.repeat_interleave(n, dim=0)
    out = []
    for i in range(0, len(expanded), settings.batch_size):
        swap = {} if late_rows is None else {
            "callback_on_step_end": late_callback(late_rows[i : i + settings.batch_size], late_index),
            "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
        result = pipe(
            prompt_embeds=expanded[i : i + settings.batch_size].to(pipe.device, pipe.unet.dtype),
            num_inference_steps=settings.steps, guidance_scale=settings.guidance,
            generator=torch.Generator().manual_seed(settings.gen_seed + i), output_type="np", **swap,
        )
        out.append(result.images.transpose(0, 3, 1, 2))
    images = np.concatenate(out).astype(np.float32)
    return images.reshape(len(embeds), n, *images.shape[1:])


def agreements(
    reader: AttributeReader | SceneReader, images: np.ndarray, wanted: list[dict[str, str]],
    checked: dict[str, tuple[str, ...]],
) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, the mean agreement of its generations with what it asks for: over the attributes
    `checked` for its group (the demo: object size; valid-v: scene kind), and over all attributes."""
    read = reader.read(images.reshape(-1, *images.shape[2:]))
    each = [w for w in wanted for _ in range(images.shape[1])]

    def per_prompt(values: list[float]) -> np.ndarray:
        return np.array(values).reshape(images.shape[:2]).mean(axis=1)

    return (per_prompt([agreement(r, w, checked.get(reader.group_of(w), ())) for r, w in zip(read, each, strict=True)]),
            per_prompt([agreement(r, w, reader.attributes) for r, w in zip(read, each, strict=True)]))


@dataclass(frozen=True)
class Content:
    """What a design's memorized images show and how their generations are read: the reader, what
    each training image's prompt names (by image id), the attributes that count per group, the
    description a person would write for an image, and the reader's measured accuracy."""

    reader: AttributeReader | SceneReader
    wanted: dict[str, dict[str, str]]
    checked: dict[str, tuple[str, ...]]
    descriptions: dict[str, str]
    facts: dict[str, Any]


def content_for(design: str, data: Any, decode: Any, settings: GenerationCheck) -> Content:
    """The demo's fitted attribute reader, or valid-v's rule-based scene reader, measured on the
    decoder's round trips of fresh renders (`decode`)."""
    if design == "valid-v":
        from memscan.demo.valid import describe as describe_scene
        from memscan.mitigation.scenes import SceneReader, named, scene_renders

        scene_reader = SceneReader()
        by_kind = scene_reader.accuracy_by_kind(*scene_renders(decode, n=settings.reader_holdout,
                                                               seed=settings.gen_seed + 1))
        checked = readable_attributes(by_kind, settings.min_reader_accuracy)
        return Content(scene_reader, {m.image_id: named(m.attrs) for m in data.memorized}, checked,
                       {m.image_id: describe_scene(m.attrs.key()) for m in data.memorized},
                       {"reader_accuracy_by_kind": _rounded(by_kind)})
    from memscan.demo.data import describe

    reader = AttributeReader.calibrated(decode, n=settings.reader_renders, seed=settings.gen_seed)
    held_out = decoded_renders(decode, n=settings.reader_holdout, seed=settings.gen_seed + 1)
    by_size = reader.accuracy_by_size(*held_out)  # measured once: it decides and it is reported
    wanted = {m.image_id: {k: getattr(m.attrs, k) for k in ATTRIBUTES} for m in data.memorized}
    accuracy = {k: round(v, 4) for k, v in reader.accuracy(*held_out).items()}
    return Content(reader, wanted, readable_attributes(by_size, settings.min_reader_accuracy),
                   {i: describe(a["shape"], a["colour"], a["size"]) for i, a in wanted.items()},
                   {"reader_accuracy_on_decoded_renders": accuracy, "reader_accuracy_by_size": _rounded(by_size)})


def _rounded(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {group: {k: round(v, 4) for k, v in values.items()} for group, values in table.items()}


def check_mitigation(
    mitigated: str | Path,
    model: str = "demo",
    settings: CheckSettings | None = None,
    *,
    embeddings: str | Path | None = None,
    prompts: pd.DataFrame | None = None,
    design: str = "demo",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per memorized prompt: copying and attribute agreement before and after; and the summary.
    `design`: the world the model was trained on (demo, or valid-v)."""
    from memscan.demo.train import design_module
    from memscan.demo.verify import copy_cutoffs, copy_table, generate, reference_images, vae_roundtrip
    from memscan.mitigation.embeddings import load_embeddings, load_late_embeddings
    from memscan.models.loading import load_model

    settings = settings or CheckSettings()
    world = design_module(design)
    rows, facts = read_scores(Path(mitigated))
    target = float(facts["target"])
    data = world.build_data(settings.data_seed)
    labels = pd.DataFrame(data.prompts) if prompts is None else prompts
    rows = rows.merge(labels[["prompt", *LABEL_COLUMNS]].drop_duplicates("prompt"), on="prompt", how="left")
    mem = rows[rows["label"] == "memorized"].reset_index(drop=True)
    if mem.empty:
        raise InputError(f"{mitigated}: no memorized {design} prompt among its rows (labels from --prompts or "
                         "--data-seed)")
    non = rows[rows["label"] == "not_memorized"]
    pipe = load_model(model, with_vae=True).pipeline
    # the demo's VAE-space copy measure, with the design's fresh renders
    cutoffs = copy_cutoffs(data, pipe, fresh_renders=world.fresh_renders)
    train = reference_images(data, pipe)
    content = content_for(design, data, partial(vae_roundtrip, pipe), settings)
    wanted = [content.wanted[i] for i in mem["train_image_id"]]
    gen = {"steps": settings.steps, "guidance": settings.guidance, "batch_size": settings.batch_size}

    def measure(images: np.ndarray, rows: pd.DataFrame, asked: list[dict[str, str]]) -> tuple[np.ndarray, ...]:
        copies = copy_table(data, rows[["prompt", *LABEL_COLUMNS]], images, cutoffs, train)["copy_rate"]
        return (copies.to_numpy(), *agreements(content.reader, images, asked, content.checked))

    def from_text(texts: pd.Series) -> np.ndarray:
        return generate(pipe, texts.tolist(), settings.n_per_prompt, settings.gen_seed, **gen)

    table = mem[["prompt_id", "prompt", "rewritten", "status", "score_before", "score_after", "similarity"]].copy()
    for variant, column in (("before", "prompt"), ("after", "rewritten")):
        (table[f"copy_{variant}"], table[f"agree_{variant}"],
         table[f"agree_{variant}_all"]) = measure(from_text(mem[column]), mem, wanted)
    # the yardstick: a clean prompt naming the same content, the caption's description alone
    table["description"] = [content.descriptions[i] for i in mem["train_image_id"]]
    (table["copy_description"], table["agree_description"],
     table["agree_description_all"]) = measure(from_text(table["description"]), mem, wanted)
    if embeddings is not None:
        saved = load_embeddings(Path(embeddings))
        has = mem["prompt_id"].isin(list(saved)).to_numpy()
        for column in ("embedding_score", "embedding_score_verified"):
            table[column] = mem.get(column, pd.Series(np.nan, index=mem.index))
        table["embedding_copy"] = table["embedding_agree"] = table["embedding_agree_all"] = np.nan
        late, made_for = load_late_embeddings(Path(embeddings))
        if late:
            _check_late_settings(made_for, settings)
            has = has & mem["prompt_id"].isin(list(late)).to_numpy()
        if has.any():
            ids = mem.loc[has, "prompt_id"]
            stacked = torch.cat([saved[i] for i in ids])
            asked = [w for w, h in zip(wanted, has, strict=True) if h]
            kept = mem[has].reset_index(drop=True)
            schedule = {} if not late else {"late": torch.cat([late[i] for i in ids]),
                                            "late_index": int(made_for["late_index"])}
            images = generate_from_embeddings(pipe, stacked, settings, **schedule)
            copies, agree, agree_all = measure(images, kept, asked)
            table.loc[has, "embedding_copy"], table.loc[has, "embedding_agree"] = copies, agree
            table.loc[has, "embedding_agree_all"] = agree_all
            if late:  # the first embedding alone, as a plain `prompt_embeds=` user generates it
                table["embedding_first_only_copy"] = np.nan
                table.loc[has, "embedding_first_only_copy"] = measure(
                    generate_from_embeddings(pipe, stacked, settings), kept, asked)[0]
    summary = {"design": design, **summarize_check(table, non, target), **content.facts}
    summary["checked_attributes"] = {group: list(keys) for group, keys in content.checked.items()}
    summary["settings"] = settings.__dict__
    return table, summary


def _check_late_settings(made_for: dict[str, Any], settings: CheckSettings) -> None:
    """Late embeddings hold for the generation they were made for: refuse a check that generates otherwise."""
    wanted = (int(made_for.get("num_inference_steps", -1)), float(made_for.get("guidance_scale", -1)))
    if wanted != (settings.steps, settings.guidance):
        raise UsageError(f"the late embeddings were made for {wanted[0]} steps at guidance {wanted[1]}; the check "
                         f"generates {settings.steps} steps at guidance {settings.guidance}")


def summarize_check(table: pd.DataFrame, non: pd.DataFrame, target: float) -> dict[str, Any]:
    """The numbers of the issue's "Done when", over the memorized prompts of a check table."""

    def share(mask: pd.Series) -> float | None:
        return round(float(mask.mean()), 4) if len(mask) else None

    attempted = table[table["status"].isin([STATUS_OK, STATUS_UNRESOLVED])]
    ok = table[table["status"] == STATUS_OK]
    sims = ok["similarity"].astype(float)
    out: dict[str, Any] = {
        "target": target, "memorized": int(len(table)), "memorized_flagged": int(len(attempted)),
        "memorized_rewritten_under_target": int(len(ok)),
        "rewrite_success_rate_of_flagged": share(attempted["status"] == STATUS_OK),
        "memorized_under_target_after": share(table["score_after"] < target),
        "copying_prompts_before": share(table["copy_before"] > 0.5),
        "generation_copy_rate_before": share(table["copy_before"]),
        "ok_prompts_no_longer_copying": share(ok["copy_after"] <= 0.5),
        "ok_prompts_copying_before_and_not_after": share(ok.loc[ok["copy_before"] > 0.5, "copy_after"] <= 0.5),
        "ok_generation_copy_rate_before": share(ok["copy_before"]),
        "ok_generation_copy_rate_after": share(ok["copy_after"]),
        "similarity_of_ok": None if ok.empty else {
            "mean": round(float(sims.mean()), 4), "min": round(float(sims.min()), 4),
            **{f"q{int(q * 100)}": round(float(sims.quantile(q)), 4) for q in (0.1, 0.25, 0.5, 0.75)},
        },
        "ok_prompts_stopped_and_kept_70pct_agreement": share(
            (ok["copy_after"] <= 0.5) & (ok["agree_after"] >= 0.7 * ok["agree_before"])
        ),
        "ok_attribute_agreement_before": share(ok["agree_before"]),
        "ok_attribute_agreement_after": share(ok["agree_after"]),
        "not_memorized": int(len(non)),
        "not_memorized_unchanged": share((non["status"] == STATUS_NOT_FLAGGED) & (non["rewritten"] == non["prompt"])),
    }
    out["ok_attribute_agreement_ratio"] = _ratio(ok, "agree_after")
    if "agree_description" in table:
        out["description_only_no_longer_copying"] = share(ok["copy_description"] <= 0.5)
        out["description_only_attribute_agreement"] = share(ok["agree_description"])
        out["description_only_attribute_agreement_ratio"] = _ratio(ok, "agree_description")
        # issue 12's content target: the rewrites' images keep what the ORIGINAL prompt names at this
        # share of the rate the model keeps it for a clean prompt naming the same (the description)
        out["ok_agreement_vs_clean_prompts"] = _ratio(ok, "agree_after", "agree_description")
    if "embedding_copy" in table:
        emb = attempted[attempted["embedding_score"].notna()]
        out["embedding_under_target_of_flagged"] = share(emb["embedding_score"] < target)
        if "embedding_score_verified" in emb:  # the independent noise bank agrees
            out["embedding_verified_under_target_of_flagged"] = share(
                (emb["embedding_score"] < target) & (emb["embedding_score_verified"] < target))
        out["embedding_generation_copy_rate_before"] = share(emb["copy_before"])
        out["embedding_generation_copy_rate_after"] = share(emb["embedding_copy"])
        out["embedding_prompts_no_longer_copying"] = share(emb["embedding_copy"] <= 0.5)
        if "embedding_first_only_copy" in emb:  # late embeddings: the first one alone, for comparison
            out["embedding_first_only_prompts_no_longer_copying"] = share(emb["embedding_first_only_copy"] <= 0.5)
        out["embedding_attribute_agreement_before"] = share(emb["agree_before"])
        out["embedding_attribute_agreement_after"] = share(emb["embedding_agree"])
        out["embedding_attribute_agreement_ratio"] = _ratio(emb, "embedding_agree")
        if "agree_description" in emb:
            out["embedding_agreement_vs_clean_prompts"] = _ratio(emb, "embedding_agree", "agree_description")
    if "agree_before_all" in table:  # the same ratios over all three attributes, readable or not
        out["attribute_agreement_ratios_all_attributes"] = {
            name: _ratio(rows, f"{column}_all", "agree_before_all")
            for name, rows, column in (("ok", ok, "agree_after"), ("description_only", ok, "agree_description"),
                                       ("embedding", attempted, "embedding_agree"))
            if f"{column}_all" in table
        }
    return out


def _ratio(rows: pd.DataFrame, after: str, before: str = "agree_before") -> float | None:
    """Mean of `after` over mean of `before` among `rows` (the rows `after` was measured for)."""
    measured = rows[rows[after].notna()]
    if measured.empty or not measured[before].mean():
        return None
    return round(float(measured[after].mean() / measured[before].mean()), 4)


def main(argv: list[str] | None = None) -> int:
    """`python -m memscan.mitigation.check MITIGATED.parquet --model demo`: print the summary JSON."""
    parser = argparse.ArgumentParser(prog="python -m memscan.mitigation.check", description=__doc__.splitlines()[0])
    parser.add_argument("mitigated", help="a `memscan mitigate` output (Parquet)")
    parser.add_argument("--model", default="demo", help="the demo or valid-v model (profile name or folder)")
    parser.add_argument("--design", default=None, choices=("demo", "valid-v"),
                        help="the world the model was trained on [default: valid-v for --model valid-v, else demo]")
    parser.add_argument("--embeddings", default=None, help="the --emit-embeddings file, to check it too")
    parser.add_argument("--prompts", default=None, help="labelled prompts.csv [default: rebuilt from --data-seed]")
    parser.add_argument("--n", type=int, default=4, help="generations per prompt and variant")
    parser.add_argument("--gen-seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=0, help="data seed the demo model was trained with")
    parser.add_argument("--out", default=None, help="write the per-prompt table here (CSV)")
    args = parser.parse_args(argv)
    prompts = pd.read_csv(args.prompts, keep_default_na=False) if args.prompts else None
    settings = CheckSettings(n_per_prompt=args.n, gen_seed=args.gen_seed, data_seed=args.data_seed)
    try:
        design = args.design or ("valid-v" if args.model == "valid-v" else "demo")
        table, summary = check_mitigation(args.mitigated, args.model, settings, embeddings=args.embeddings,
                                          prompts=prompts, design=design)
    except MemscanError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
    if args.out:
        table.to_csv(args.out, index=False)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
