"""`memscan demo {train,train-judge,export,verify,score}`: thin typer commands over memscan.demo.

    train        train the demo model into a diffusers folder         (memscan.demo.train.train_demo)
    train-judge  train the CLIP stand-in, mitigate's text judge       (memscan.demo.judge.train_judge)
    export       write prompts.csv and the memorized training images  (memscan.demo.data.export_data)
    verify       generate (DDIM 50, guidance 7.5), report copying     (memscan.demo.verify.verify_model)
    score        detection AUC / TPR@1%FPR on the labelled prompts    (memscan.demo.evaluate.score_model)

Results (JSON) go to stdout, logs to stderr. torch and diffusers are imported inside the commands,
so `memscan --help` stays fast; so is memscan.cli (it imports this module).
"""

# ruff: noqa: E501  (typer option declarations read best on one line each, as in memscan/cli.py)

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

demo_app = typer.Typer(
    help="The bundled demo model: train it, export its labelled prompts, verify copying, score detection.",
    no_args_is_help=True,
)


def _errors() -> AbstractContextManager[None]:
    """memscan's `cli_errors()`: one stderr line and the exit code of memscan's exceptions."""
    from memscan.cli import cli_errors  # late: memscan.cli imports this module

    return cli_errors()


def _say(line: str) -> None:
    from memscan.cli import _say as say

    say(line)


def _ints(option: str, text: str | None) -> tuple[int, ...] | None:
    """'32,64,64' -> (32, 64, 64)."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        from memscan.errors import UsageError

        raise UsageError(f"{option} takes comma-separated integers, e.g. 32,64,64 (got {text!r})") from None


def _shipped_model() -> Path:
    """The bundled demo model folder, in a checkout (data/demo/model) or an installed wheel."""
    from memscan.paths import demo_model_dir

    return demo_model_dir()


@demo_app.command("train")
def train_cmd(
    out: Annotated[Path, typer.Option(help="The diffusers model folder to write.")],
    work_dir: Annotated[Path | None, typer.Option("--work-dir", help="Checkpoints (default: OUT.work); reruns resume.")] = None,
    seed: Annotated[int, typer.Option(help="Data and training seed.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Diffusion training steps (default: 4000).")] = None,
    batch: Annotated[int | None, typer.Option(help="Diffusion batch size (default: 128).")] = None,
    lr: Annotated[float | None, typer.Option(help="Diffusion learning rate (default: 1e-3).")] = None,
    vae_steps: Annotated[int | None, typer.Option("--vae-steps", help="VAE training steps (default: 800).")] = None,
    memorized_share: Annotated[float | None, typer.Option("--memorized-share", help="Share of every batch drawn from the memorized images (default: 0.3).")] = None,
    caption_dropout: Annotated[float | None, typer.Option("--caption-dropout", help="Caption dropout of the generic samples (default: 0.1).")] = None,
    phrasing_variety: Annotated[float | None, typer.Option("--phrasing-variety", help="Share of generic captions said another way, e.g. 'a photo of ...' (default: 0.5).")] = None,
    min_snr_gamma: Annotated[float | None, typer.Option("--min-snr-gamma", help="Min-SNR loss weighting; 0 = plain MSE (default: plain MSE).")] = None,
    pool_size: Annotated[int | None, typer.Option("--pool-size", help="Generic images rendered (default: 40000).")] = None,
    unet_channels: Annotated[str | None, typer.Option("--unet-channels", help="UNet block_out_channels, e.g. 32,64,64.")] = None,
    unet_heads: Annotated[int | None, typer.Option("--unet-heads", help="UNet attention heads.")] = None,
    text_width: Annotated[int | None, typer.Option("--text-width", help="Text encoder width.")] = None,
    text_layers: Annotated[int | None, typer.Option("--text-layers", help="Text encoder layers.")] = None,
    vae_channels: Annotated[str | None, typer.Option("--vae-channels", help="VAE block_out_channels, e.g. 32,64,64.")] = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="Tiny architecture (tests).")] = False,
    design: Annotated[str, typer.Option("--design", help="demo (the demo model), or valid-v (the second test model: v-prediction, its own images and words; data/valid-v).")] = "demo",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
    threads: Annotated[int, typer.Option(help="torch CPU threads (same seed and threads give the same weights).")] = 1,
) -> None:
    """Train the demo model (VAE, then text encoder + UNet) into a diffusers folder."""
    with _errors():
        import torch

        from memscan.demo.train import demo_config, train_demo

        cfg = demo_config(
            tiny=tiny, min_snr_gamma=min_snr_gamma, design=design, seed=seed, steps=steps, batch=batch, lr=lr,
            vae_steps=vae_steps, memorized_share=memorized_share, caption_dropout=caption_dropout,
            phrasing_variety=phrasing_variety,
            pool_size=pool_size, unet_channels=_ints("--unet-channels", unet_channels), unet_heads=unet_heads,
            text_width=text_width, text_layers=text_layers, vae_channels=_ints("--vae-channels", vae_channels),
        )
        torch.set_num_threads(threads)
        summary = train_demo(out, cfg, device=device, work_dir=work_dir)
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}))
        _say(f"final loss {summary['final_loss']:.4g} -> {out}")


@demo_app.command("train-judge")
def train_judge_cmd(
    out: Annotated[Path | None, typer.Option(help="The judge folder to write (a CLIP text model; default: data/DESIGN/judge).")] = None,
    seed: Annotated[int, typer.Option(help="Data and training seed.")] = 0,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 1500,
    design: Annotated[str, typer.Option("--design", help="demo (the demo's judge), or valid-v (the second test model's: its own images and words; data/valid-v).")] = "demo",
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
) -> None:
    """Train the demo's CLIP stand-in, the text similarity judge of `memscan mitigate` on the demo (or on valid-v)."""
    with _errors():
        import torch

        from memscan.demo.judge import JudgeConfig, train_judge
        from memscan.demo.train import design_module

        design_module(design)  # a UsageError for an unknown design
        out = out or Path("data") / design / "judge"
        torch.set_num_threads(threads)
        summary = train_judge(out, JudgeConfig(seed=seed, steps=steps), design=design, log=_say)
        typer.echo(json.dumps(summary))
        _say(f"final loss {summary['final_loss']:.4g} -> {out}")


@demo_app.command("export")
def export_cmd(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for prompts.csv and train_images.npz.")] = Path("data/demo"),
    seed: Annotated[int, typer.Option(help="Data seed.")] = 0,
    design: Annotated[str, typer.Option("--design", help="demo, or valid-v (the second test model).")] = "demo",
    generic: Annotated[int | None, typer.Option("--generic", min=1, max=100_000, help="Clean generic captions to write (default 200, at most 100,000; more give calibrate's FPR guarantee the clean families it counts, the first 200 unchanged).")] = None,
) -> None:
    """Write the labelled prompts (prompts.csv) and the memorized training images (train_images.npz)."""
    with _errors():
        from memscan.demo.train import design_module

        s = design_module(design).export_data(out_dir, seed, n_generic_eval=generic)
        _say(f"wrote {s['prompts_csv']} ({s['n_prompts']} prompts) and {s['train_images']} ({s['n_images']} images)")


@demo_app.command("verify")
def verify_cmd(
    model: Annotated[Path | None, typer.Option(help="The demo model folder (default: the bundled one).")] = None,
    seed: Annotated[int, typer.Option(help="Data seed the model was trained with.")] = 0,
    prompts: Annotated[Path | None, typer.Option(help="prompts.csv (default: rebuilt from --seed).")] = None,
    n: Annotated[int, typer.Option("--n", help="Generations per prompt.")] = 4,
    gen_seed: Annotated[int, typer.Option("--gen-seed", help="Seed of the generations.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Write the per-prompt table (csv) and the generations (.npz next to it).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
    design: Annotated[str, typer.Option("--design", help="The model's data design: demo, or valid-v (the second test model).")] = "demo",
) -> None:
    """Generate (DDIM 50, guidance 7.5) for the labelled prompts and report copying of training images."""
    with _errors():
        from memscan.demo.verify import verify_model

        result = verify_model(model or _shipped_model(), seed=seed, prompts=prompts, n=n, gen_seed=gen_seed, out=out, device=device,
                              design=design)
        typer.echo(json.dumps(result))
        if out:
            _say(f"per-prompt table -> {out}, generations -> {out.with_suffix('.npz')}")


@demo_app.command("score")
def score_cmd(
    model: Annotated[Path | None, typer.Option(help="The demo model folder (default: the bundled one).")] = None,
    seed: Annotated[int, typer.Option(help="Data seed the model was trained with.")] = 0,
    prompts: Annotated[Path | None, typer.Option(help="prompts.csv (default: rebuilt from --seed).")] = None,
    n: Annotated[int, typer.Option("--n", help="Noise samples per prompt.")] = 1,
    score_seed: Annotated[int, typer.Option("--score-seed", help="Seed of the shared noise.")] = 51,
    minimal: Annotated[bool, typer.Option("--minimal", help="The demo's own minimal scorer, not memscan's.")] = False,
    w_norm: Annotated[float, typer.Option("--w-norm", help="Weight of the norm term (--minimal).")] = 1.0,
    w_align: Annotated[float, typer.Option("--w-align", help="Weight of the alignment term (--minimal).")] = 1.0,
    out: Annotated[Path | None, typer.Option(help="Write the scored prompts (csv).")] = None,
) -> None:
    """Detection AUC and TPR@1%FPR on the labelled prompts."""
    with _errors():
        from memscan.demo.evaluate import score_model

        result = score_model(model or _shipped_model(), seed=seed, prompts=prompts, n=n, score_seed=score_seed, minimal=minimal,
                             w_norm=w_norm, w_align=w_align, out=out)
        typer.echo(json.dumps(result))
        if out:
            _say(f"scored prompts -> {out}")
