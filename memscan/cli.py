"""The `memscan` command line: thin typer commands over library calls.

Every error a user can cause becomes one line on stderr and a documented exit code
(see memscan.errors); logs and tables go to stderr, `--json` summaries to stdout.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from memscan import __version__
from memscan.errors import (
    EXIT_FLAGGED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    FlaggedPromptsError,
    MemscanError,
)

app = typer.Typer(
    name="memscan",
    help="Audit prompts for training-data memorization in Stable Diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)


def _say(line: str) -> None:
    """One unwrapped line on stderr (log lines and errors must stay greppable)."""
    typer.echo(" ".join(line.split("\n")), err=True)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn memscan's exceptions into one stderr line and their exit code (no traceback)."""
    try:
        yield
    except MemscanError as exc:
        _say(f"memscan: error: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _say("memscan: interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
        if os.environ.get("MEMSCAN_DEBUG"):
            raise
        _say(f"memscan: internal error: {type(exc).__name__}: {exc} (MEMSCAN_DEBUG=1 shows the traceback)")
        raise typer.Exit(EXIT_INTERNAL) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"memscan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """memscan: memorization audits for Stable Diffusion prompts."""


def _top_table(top: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("prompt_id")
    table.add_column("prompt", overflow="fold")
    for rank, row in enumerate(top, 1):
        table.add_row(str(rank), f"{row['score']:.4f}", str(row["prompt_id"]), str(row["prompt"] or ""))
    return table


def _default_output(input_path: Path) -> Path:
    name = input_path.name
    for suffix in (".gz", ".csv", ".tsv", ".parquet", ".jsonl", ".txt"):
        name = name.removesuffix(suffix)
    return Path(f"{name}.scores.parquet")


@app.command()
def detect(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="Prompts: CSV, TSV, Parquet, JSONL or TXT (optionally .gz).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Scores Parquet file [default: INPUT-NAME.scores.parquet].")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Profile name, local diffusers folder, .safetensors file, or hub id.")] = "demo",
    method: Annotated[str, typer.Option(help="Detection method.")] = "anisotropy",
    n_noise: Annotated[int, typer.Option("--n-noise", help="Initial noises per prompt (n).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the shared noise bank.")] = 51,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per UNet call.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")] = "auto",
    threshold: Annotated[float | None, typer.Option(help="Flag scores above this [default: the profile's].")] = None,
    w_norm: Annotated[float | None, typer.Option("--w-norm", help="Weight of the norm term [default: the profile's].")] = None,
    w_align: Annotated[float | None, typer.Option("--w-align", help="Weight of the alignment term [default: the profile's].")] = None,
    v_convention: Annotated[str | None, typer.Option("--v-convention", help="v-prediction models: epsilon (convert v to eps) or raw (score raw v, as the reference code).")] = None,
    architecture: Annotated[str | None, typer.Option(help="Config folder for a single-file checkpoint: sd-v1, sd-v2, sd-v2-base.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow .ckpt/.bin checkpoints (they can run code).")] = False,
    prompt_column: Annotated[str | None, typer.Option("--prompt-column", help="Prompt column [default: prompt, caption or text].")] = None,
    id_column: Annotated[str | None, typer.Option("--id-column", help="Id column [default: FILE:ROW].")] = None,
    store_prompt: Annotated[bool, typer.Option("--store-prompt/--no-store-prompt", help="Keep the prompt text in the output.")] = True,
    if_exists: Annotated[str, typer.Option("--if-exists", help="If the output exists: fail or overwrite.")] = "fail",
    top: Annotated[int, typer.Option(help="Top-scored prompts to show.")] = 10,
    json_summary: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    fail_on_flagged: Annotated[bool, typer.Option("--fail-on-flagged", help=f"Exit {EXIT_FLAGGED} when prompts are flagged.")] = False,
) -> None:
    """Score every prompt with the anisotropy memorization metric and write Parquet."""
    with cli_errors():
        from memscan.config import DetectSettings
        from memscan.detect import detect as run_detect

        settings = DetectSettings(
            model=model, method=method, n_noise=n_noise, seed=seed, batch_size=batch_size, device=device,
            dtype=dtype, threshold=threshold, w_norm=w_norm, w_align=w_align, v_convention=v_convention,
            architecture=architecture, allow_pickle=allow_pickle, prompt_column=prompt_column,
            id_column=id_column, store_prompt=store_prompt,
        )
        result = run_detect(input_path, output or _default_output(input_path), settings, if_exists=if_exists, top=top)
        summary = result.summary
        if json_summary:
            typer.echo(json.dumps(summary, indent=2))
        if top > 0 and (stderr.is_terminal or not json_summary):
            stderr.print(_top_table(summary["top"], f"top {len(summary['top'])} of {summary['scored']} scored prompts"))
        flagged = summary["flagged"]
        _say(
            f"{summary['rows']} rows, {summary['scored']} scored, {summary['skipped_empty']} empty, "
            f"{'no threshold' if flagged is None else f'{flagged} flagged'}, "
            f"{summary['prompts_per_second']} prompts/s -> {summary['output']}"
        )
        if fail_on_flagged and flagged:
            raise FlaggedPromptsError(f"{flagged} prompts flagged")


@app.command("models")
def list_models() -> None:
    """List the shipped model profiles."""
    with cli_errors():
        from memscan.models.profiles import available_profiles, load_profile

        table = Table(title="model profiles")
        for column in ("name", "source", "prediction", "res", "w_norm", "w_align", "threshold"):
            table.add_column(column, no_wrap=column != "source", overflow="fold")
        for name in available_profiles():
            p = load_profile(name)
            table.add_row(name, p.source, p.prediction_type, str(p.resolution), str(p.w_norm), str(p.w_align),
                          "-" if p.threshold is None else f"{p.threshold:.4g}")
        Console().print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
