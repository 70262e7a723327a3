"""When in the 50 denoising steps does a memorized demo / valid-v prompt get its copy? Generate from the
optimised embedding for the first k steps and the prompt's own embedding for the rest (or the other
way round), and count the memorized prompts that still copy.

Why: an embedding optimised on the score read at the start of generation stops only 74% of the demo's
copies. If the copy were settled in the first steps (as Jain et al., CVPR 2025, find for SD), handing
over to the prompt after them would keep stopping it; if it is settled late, it will not. `--order
empty-first` runs Jain et al.'s own static-transition mitigation (no guidance, i.e. the empty prompt's
prediction, before step k; the prompt after). Same seeds and
copy measure as `python -m memscan.mitigation.check` (its k = steps row equals that check's
embedding row).

    memscan mitigate scores.parquet -o m.parquet --emit-embeddings e.safetensors
    OMP_NUM_THREADS=1 python benchmarks/embedding_handoff.py m.parquet e.safetensors --ks 0,10,20,30,50
    # valid-v: add --model PROFILE --design valid-v --prompts data/valid-v/prompts.csv
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def main() -> None:
    from memscan.demo.train import design_module
    from memscan.demo.verify import copy_cutoffs, copy_table, reference_images, vae_roundtrip
    from memscan.io.scores import read_scores
    from memscan.mitigation.check import LABEL_COLUMNS, CheckSettings, agreements, content_for
    from memscan.mitigation.embeddings import load_embeddings
    from memscan.mitigation.late import late_callback
    from memscan.models.loading import load_model
    from memscan.models.text import encode_prompts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mitigated", help="a `memscan mitigate` output of the memorized prompts")
    parser.add_argument("embeddings", help="its --emit-embeddings file")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--design", default="demo", choices=("demo", "valid-v"))
    parser.add_argument("--prompts", default="data/demo/prompts.csv", help="labelled prompts.csv")
    parser.add_argument("--ks", default="0,10,20,30,50", help="steps generated from the first embedding")
    parser.add_argument("--order", default="embedding-first",
                        choices=("embedding-first", "prompt-first", "empty-first"),
                        help="empty-first: the empty prompt, then the prompt's own (Jain et al.'s static transition "
                             "point with guidance 0 before it)")
    args = parser.parse_args()

    settings = CheckSettings()
    world = design_module(args.design)
    data = world.build_data(settings.data_seed)
    rows, _ = read_scores(Path(args.mitigated))
    labels = pd.read_csv(args.prompts, keep_default_na=False)
    rows = rows.merge(labels[["prompt", *LABEL_COLUMNS]].drop_duplicates("prompt"), on="prompt", how="left")
    saved = load_embeddings(Path(args.embeddings))
    mem = rows[(rows["label"] == "memorized") & rows["prompt_id"].isin(list(saved))].reset_index(drop=True)
    loaded = load_model(args.model, with_vae=True)
    pipe = loaded.pipeline
    cutoffs = copy_cutoffs(data, pipe, fresh_renders=world.fresh_renders)
    train = reference_images(data, pipe)
    content = content_for(args.design, data, partial(vae_roundtrip, pipe), settings)
    wanted = [content.wanted[i] for i in mem["train_image_id"]]
    optimised = torch.cat([saved[i] for i in mem["prompt_id"]])
    with torch.no_grad():
        own = encode_prompts(loaded, mem["prompt"].tolist()).to(optimised.dtype)
        empty = encode_prompts(loaded, [""]).to(own).expand_as(own).contiguous()
    first, then = {"embedding-first": (optimised, own), "prompt-first": (own, optimised),
                   "empty-first": (empty, own)}[args.order]
    n = settings.n_per_prompt

    @torch.no_grad()
    def generate(k: int) -> np.ndarray:
        """Images from `first` for steps < k and `then` after (seeded as the check seeds them)."""
        a, b = first.repeat_interleave(n, 0), then.repeat_interleave(n, 0)
        out = []
        for i in range(0, len(a), settings.batch_size):
            head, tail = a[i : i + settings.batch_size], b[i : i + settings.batch_size]
            result = pipe(prompt_embeds=head if k > 0 else tail, num_inference_steps=settings.steps,
                          guidance_scale=settings.guidance, output_type="np",
                          generator=torch.Generator().manual_seed(settings.gen_seed + i),
                          callback_on_step_end=late_callback(tail, k),
                          callback_on_step_end_tensor_inputs=["prompt_embeds"])
            out.append(result.images.transpose(0, 3, 1, 2))
        images = np.concatenate(out).astype(np.float32)
        return images.reshape(len(mem), n, *images.shape[1:])

    copying = None
    for k in (int(x) for x in args.ks.split(",")):
        images = generate(k)
        copies = copy_table(data, mem[["prompt", *LABEL_COLUMNS]], images, cutoffs, train)["copy_rate"].to_numpy()
        agree, _ = agreements(content.reader, images, wanted, content.checked)
        if copying is None:  # the first row names the prompts that copy (k = 0 embedding-first: the prompt alone)
            copying = copies > 0.5
        print(json.dumps({"order": args.order, "k": k, "prompts": len(mem),
                          "copying": int((copies > 0.5).sum()),
                          "of_first_rows_copying_stopped": int((copies[copying] <= 0.5).sum()),
                          "first_rows_copying": int(copying.sum()),
                          "attribute_agreement": round(float(np.nanmean(agree)), 4)}), flush=True)


if __name__ == "__main__":
    main()
