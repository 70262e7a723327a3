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
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from memscan import __version__
from memscan.demo.cli import demo_app
from memscan.errors import (
    EXIT_FLAGGED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    ConfigError,
    FlaggedPromptsError,
    MemscanError,
    UsageError,
)
from memscan.outputs import check_output, output_kind

METHODS_PLACEHOLDER = "{methods}"  # filled from the methods registry when help is shown (it imports torch)
# click's error base as typer uses it (typer >= 0.2x carries its own copy of click, older typer uses click)
ClickException: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_NO_ARGS_IS_HELP: Any = getattr(sys.modules[ClickException.__module__], "NoArgsIsHelpError", ())


def _say(line: str) -> None:
    """One unwrapped line on stderr (log lines and errors must stay greppable)."""
    typer.echo(" ".join(line.split("\n")), err=True)


def _flag_name(param: Any) -> str:
    """An option's long name without dashes (`--n-noise` -> `n-noise`): its config key, and with the
    command its environment variable (MEMSCAN_DETECT_N_NOISE)."""
    longs = [opt for opt in param.opts if opt.startswith("--")]
    return (longs[0] if longs else param.opts[0]).lstrip("-")


def _settable(param: Any) -> bool:
    """A real option: one that may come from a config file or the environment (not an argument,
    not --help or --version, which would turn `MEMSCAN_VERSION=1 memscan detect` into a no-op)."""
    return param.param_type_name == "option" and param.expose_value and not param.is_eager


def _wire_settings(command: Any, path: tuple[str, ...] = ()) -> None:
    """Give every real option of every subcommand its environment variable MEMSCAN_<COMMAND>_<FLAG>
    (shown in --help), and print help and errors as plain text: a `[` in help is text, not markup."""
    if isinstance(command, (TyperCommand, TyperGroup)):
        command.rich_markup_mode = None
    for name, sub in getattr(command, "commands", {}).items():
        _wire_settings(sub, (*path, name))
    if not path:
        return
    for param in command.params:
        if _settable(param):
            param.envvar = "_".join(("MEMSCAN", *path, _flag_name(param))).upper().replace("-", "_")
            param.show_envvar = True


class _OneLineError(ClickException):
    """A click usage error (unknown option, missing argument, bad value) shown as memscan shows every
    error: one line on stderr, same exit code (2), no boxed panel."""

    def __init__(self, original: Any) -> None:
        super().__init__(original.format_message())
        self.exit_code = original.exit_code
        ctx = getattr(original, "ctx", None)
        self.hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""

    def show(self, file: Any = None) -> None:
        _say(f"memscan: error: {self.message}{self.hint}")


@contextmanager
def _one_line_click_errors() -> Iterator[None]:
    """Re-raise click's errors as _OneLineError (a bare `memscan` / `memscan demo` still shows help)."""
    try:
        yield
    except (_OneLineError, _NO_ARGS_IS_HELP):
        raise
    except ClickException as exc:
        raise _OneLineError(exc) from None


class MemscanGroup(TyperGroup):
    """The root command: wires settings (see _wire_settings) and keeps click's errors to one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _wire_settings(self)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        with _one_line_click_errors():
            return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_click_errors():
            return super().invoke(ctx)


class MethodsCommand(TyperCommand):
    """A command whose help names the methods of the registry (imported only when help is shown)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if any(METHODS_PLACEHOLDER in (getattr(p, "help", None) or "") for p in self.params):
            from memscan.methods import available_methods

            names = ", ".join(available_methods())
            for param in self.params:
                if param.param_type_name == "option" and param.help:
                    param.help = param.help.replace(METHODS_PLACEHOLDER, names)
        super().format_help(ctx, formatter)


app = typer.Typer(
    name="memscan",
    cls=MemscanGroup,
    help="Audit prompts for training-data memorization in Stable Diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    # settings: defaults < --config FILE < environment (MEMSCAN_<COMMAND>_<FLAG>, see _wire_settings) < flags
)
app.add_typer(demo_app, name="demo")
stderr = Console(stderr=True)


def _text(value: Any) -> Text:
    """A user string (prompt, file name, method spec, model path) as literal text for a rich table:
    `[blurry]` and `[/]` are data, never markup."""
    return Text("" if value is None else str(value))


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


def _load_config(ctx: typer.Context, path: Path) -> dict[str, Any]:
    """A TOML file with one table per command (`[detect]`, `[demo.train]`, ...) as click's default_map;
    keys are the flag names (`n-noise` or `n_noise`, `json`)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    return _config_defaults(ctx.command, raw, (), path)


def _config_defaults(command: Any, table: dict[str, Any], where: tuple[str, ...], path: Path) -> dict[str, Any]:
    """One config table as click's default_map for `command` (a group: one sub-table per subcommand)."""
    commands = getattr(command, "commands", None)
    if commands is not None:
        defaults = {}
        for name, sub in table.items():
            if name not in commands or not isinstance(sub, dict):
                raise ConfigError(f"config {path}: [{'.'.join((*where, name))}] is not a memscan command "
                                  f"(commands: {', '.join(sorted(commands))})")
            defaults[name] = _config_defaults(commands[name], sub, (*where, name), path)
        return defaults
    keys: dict[str, str] = {}
    for param in command.params:
        if _settable(param) and param.name:
            flag = _flag_name(param)
            keys[flag] = keys[flag.replace("-", "_")] = param.name
    unknown = sorted(key for key in table if key not in keys)
    if unknown:
        valid = sorted({_flag_name(p) for p in command.params if _settable(p)})
        raise ConfigError(f"config {path}: [{'.'.join(where)}] has unknown options {', '.join(unknown)}; "
                          f"valid: {', '.join(valid)}")
    return {keys[key]: value for key, value in table.items()}




@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", envvar="MEMSCAN_CONFIG", help="TOML file of defaults, one [command] table each."),
    ] = None,
) -> None:
    """memscan: memorization audits for Stable Diffusion prompts.

    Settings come from defaults < --config FILE < environment (MEMSCAN_DETECT_MODEL, ...) < flags."""
    if config is not None:
        with cli_errors():
            ctx.default_map = _load_config(ctx, config)


PROMPT_CHARS = 120  # a prompt in the top table is cut to one line of at most this many characters


def _one_line(text: Any, limit: int = PROMPT_CHARS) -> Text:
    """A user string as literal text (never markup) on one line, cut with an ellipsis past `limit`."""
    flat = " ".join(str(text if text is not None else "").split())
    return Text(flat if len(flat) <= limit else flat[: limit - 1] + "…", no_wrap=True, overflow="ellipsis")


def _top_table(top: list[dict[str, Any]], title: str, threshold: float | None = None) -> Table:
    """The top-scored prompts, one line each (prompts cut, never read as markup), with their flag."""
    title += f" (threshold {threshold:g})" if threshold is not None else " (no threshold: not calibrated, nothing flagged)"
    table = Table(title=Text(title), title_justify="left")
    table.add_column("#", justify="right", no_wrap=True, min_width=2)
    table.add_column("score", justify="right", no_wrap=True, min_width=8)
    table.add_column("flag", no_wrap=True, min_width=4)
    table.add_column("prompt_id", overflow="ellipsis", max_width=40)
    table.add_column("prompt", overflow="ellipsis")  # wrappable, so it is the column that narrows
    for rank, row in enumerate(top, 1):
        flag = row.get("flagged")
        table.add_row(str(rank), f"{row['score']:.4f}", "-" if flag is None else ("yes" if flag else "no"),
                      _one_line(row["prompt_id"], 40), _one_line(row["prompt"]))
    return table


STORAGE_OPTION_HELP = ("fsspec storage option KEY=VALUE for URL inputs and outputs (s3://, gs://, az://, hf://; "
                       "repeatable; VALUE is read as JSON when it parses): endpoint_url=http://localhost:9000, "
                       "anon=true; s3.KEY for one protocol only.")


def _storage_options(items: list[str] | None) -> None:
    """--storage-option KEY=VALUE (repeatable): options of the URL filesystems (memscan.storage), for
    this process and the workers it starts."""
    if items:
        from memscan import storage

        storage.configure(storage.parse_storage_options(items))


def _default_output(input_path: Path | str) -> Path:
    name = Path(input_path).name
    for suffix in (".gz", ".csv", ".tsv", ".parquet", ".jsonl", ".txt"):
        name = name.removesuffix(suffix)
    return Path(f"{name}.scores.parquet")


# Options that several commands share, declared once (the environment names are set per command).
AllowPickleOption = Annotated[bool, typer.Option("--allow-pickle", help="Allow .ckpt/.bin checkpoints (they can run code).")]
ArchitectureOption = Annotated[str | None, typer.Option(help="Config folder for a single-file checkpoint: sd-v1, sd-v2, sd-v2-base.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", help="Prompts per UNet call.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOption = Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")]
ExecutorOption = Annotated[str, typer.Option(help="local or ray (run directories; ray needs memscan[ray]).")]
GpusOption = Annotated[str | None, typer.Option(help="One worker process per GPU: 0,1,... or all (run directories).")]
IdColumnOption = Annotated[str | None, typer.Option("--id-column", help="Id column (default: FILE:ROW).")]
IfExistsFileOption = Annotated[str, typer.Option("--if-exists", help="Output exists: fail or overwrite (never over an input).")]
IfExistsOption = Annotated[str | None, typer.Option("--if-exists", help="Output exists: fail, overwrite, or resume (run directories) (default: fail for a file, resume for a directory).")]
JsonCountsOption = Annotated[bool, typer.Option("--json", help="Print the counts as JSON on stdout.")]
JsonOutOption = Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")]
JsonSummaryOption = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
LabelColumnOption = Annotated[str, typer.Option("--label-column", help="Name of the label column.")]
LogIntervalOption = Annotated[float, typer.Option("--log-interval", help="Seconds between progress lines when not on a terminal.")]
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Profile name, local diffusers folder, .safetensors file, or hub id.")]
NNoiseOption = Annotated[int | None, typer.Option("--n-noise", help="Initial noises per prompt (n) (default: the profile's calibration n_noise, else 1).")]
NormScaleOption = Annotated[str | None, typer.Option("--norm-scale", help="Norm term: none, or reference-v (x sqrt(abar)/(1-abar) at t_hi, the reference code's SD 2 / Realistic Vision branch; sharpness: that score instead of -pred/sigma) (default: the profile's).")]
PromptColumnOption = Annotated[str | None, typer.Option("--prompt-column", help="Prompt column (default: prompt, caption or text).")]
SeedOption = Annotated[int | None, typer.Option(help="Seed of the shared noise bank (default: the profile's calibration seed, else 51).")]
ShardSizeOption = Annotated[int, typer.Option("--shard-size", help="Rows per shard (run directories).")]
StepsOption = Annotated[int, typer.Option(help="DDIM steps.")]
StorageOptions = Annotated[list[str] | None, typer.Option("--storage-option", help=STORAGE_OPTION_HELP)]
StorePromptOption = Annotated[bool, typer.Option("--store-prompt/--no-store-prompt", help="Keep the prompt text in the output.")]
VConventionOption = Annotated[str | None, typer.Option("--v-convention", help="v-prediction models: epsilon (convert v to eps) or raw (score raw v, as the reference code).")]
VaeModelOption = Annotated[str, typer.Option("--model", "-m", help="Profile name, local diffusers folder, or hub id (with a VAE).")]
WAlignOption = Annotated[float | None, typer.Option("--w-align", help="Weight of the alignment term (default: the profile's).")]
WNormOption = Annotated[float | None, typer.Option("--w-norm", help="Weight of the norm term (default: the profile's).")]
WorkersOption = Annotated[int | None, typer.Option(help="Worker processes (CPU) or Ray actors (run directories).")]


@app.command(cls=MethodsCommand, epilog=(
    "\b\nExamples:\n"
    "  memscan detect prompts.csv -o scores.parquet --model sd-v1-4\n"
    "  memscan detect captions/ -o audit/ --model sd-v1-4 --gpus all   # a run directory"
))
def detect(
    input_path: Annotated[str, typer.Argument(metavar="INPUT", help="Prompts: CSV, TSV, Parquet, JSONL or TXT (optionally .gz), a local path or URL (s3://, gs://, az://, hf://, https://); a folder, prefix or glob for a run directory.")],
    output: Annotated[str | None, typer.Option("-o", "--output", help="A .parquet file, or a run directory (sharded, resumable): an existing directory, a path ending in '/', or a name with no suffix; other suffixes are refused (default: INPUT-NAME.scores.parquet).")] = None,
    model: ModelOption = "demo",
    method: Annotated[str | None, typer.Option(help=f"Detection method: {METHODS_PLACEHOLDER}; options as NAME:key=value, e.g. wen:steps=10 (default: the one the profile was calibrated with, else anisotropy).")] = None,
    n_noise: NNoiseOption = None,
    seed: SeedOption = None,
    batch_size: Annotated[str, typer.Option("--batch-size", help="Prompts per UNet call, or auto: 16 off CUDA, sized from free GPU memory on CUDA (halved on out-of-memory).")] = "auto",
    compile_unet: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (static shapes; pays off on a GPU for long runs: compiling takes a minute or more).")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threshold: Annotated[float | None, typer.Option(help="Flag scores above this (default: the profile's).")] = None,
    w_norm: WNormOption = None,
    w_align: WAlignOption = None,
    v_convention: VConventionOption = None,
    norm_scale: NormScaleOption = None,
    architecture: ArchitectureOption = None,
    allow_pickle: AllowPickleOption = False,
    prompt_column: PromptColumnOption = None,
    id_column: IdColumnOption = None,
    store_prompt: StorePromptOption = True,
    if_exists: IfExistsOption = None,
    shard_size: ShardSizeOption = 10_000,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Rescore only rows whose status is not ok (run directories).")] = False,
    workers: WorkersOption = None,
    gpus: GpusOption = None,
    executor: ExecutorOption = "local",
    log_interval: LogIntervalOption = 60.0,
    top: Annotated[int, typer.Option(help="Top-scored prompts to show (single-file output).")] = 10,
    json_summary: JsonSummaryOption = False,
    fail_on_flagged: Annotated[bool, typer.Option("--fail-on-flagged", help=f"Exit {EXIT_FLAGGED} when prompts are flagged.")] = False,
    previous: Annotated[str | None, typer.Option("--previous", help="The last audit (scores file or run directory): the summary counts prompts newly flagged, no longer flagged, added, removed, unscored since (see `memscan diff`).")] = None,
    fail_on_new_flagged: Annotated[bool, typer.Option("--fail-on-new-flagged", help=f"Exit {EXIT_FLAGGED} only when a prompt is flagged that was not flagged in --previous.")] = False,
    storage_option: StorageOptions = None,
    cache: Annotated[str | None, typer.Option("--cache", help="Score cache (a folder or fsspec URL, e.g. s3://bucket/memscan-cache/): prompts already scored under the same model and settings are read from it, new ones scored and added (see `memscan cache`).")] = None,
) -> None:
    """Score every prompt with the anisotropy memorization metric and write Parquet."""
    with cli_errors():
        _storage_options(storage_option)
        from memscan.config import DetectSettings

        settings = DetectSettings(
            model=model, method=method, n_noise=n_noise, seed=seed, batch_size=batch_size, compile=compile_unet, device=device,
            dtype=dtype, threshold=threshold, w_norm=w_norm, w_align=w_align, v_convention=v_convention,
            norm_scale=norm_scale,
            architecture=architecture, allow_pickle=allow_pickle, prompt_column=prompt_column,
            id_column=id_column, store_prompt=store_prompt, cache=cache,
        )
        output = output or str(_default_output(input_path))
        if output_kind(output) == "run":
            from memscan.run import RunOptions, run_detect

            options = RunOptions(shard_size=shard_size, if_exists=if_exists or "resume", retry_errors=retry_errors)
            outcome = run_detect(
                input_path, output, settings, options, executor=executor, workers=workers, gpus=gpus,
                fail_on_flagged=fail_on_flagged, log_interval=log_interval, previous=previous,
                fail_on_new_flagged=fail_on_new_flagged,
            )
            _report_run(outcome.summary, json_summary)
            raise typer.Exit(outcome.exit_code)
        if gpus or workers or executor != "local" or retry_errors:
            raise UsageError("--gpus, --workers, --executor and --retry-errors need a run directory (-o DIR)")
        _detect_file(input_path, output, settings, if_exists or "fail", top, json_summary, fail_on_flagged, log_interval, previous=previous,
                     fail_on_new_flagged=fail_on_new_flagged)


def _detect_file(input_path: str, output: str, settings: Any, if_exists: str, top: int, json_summary: bool,
                 fail_on_flagged: bool, log_interval: float = 60.0,
                 previous: str | None = None, fail_on_new_flagged: bool = False) -> None:
    """Single-file detect: score everything in one go and write one Parquet file.

    Progress goes to stderr: a live bar on a terminal, else a line every `log_interval` seconds."""
    from memscan.detect import detect as run_detect_file
    from memscan.progress import Progress

    if fail_on_new_flagged and previous is None:
        raise UsageError("--fail-on-new-flagged needs --previous (the last audit's scores file or run directory)")

    progress = Progress(interval=log_interval, stream=sys.stderr)
    summary = run_detect_file(input_path, output, settings, if_exists=if_exists, top=top, progress=progress, previous=previous).summary
    if json_summary:
        typer.echo(json.dumps(summary, indent=2))
    if top > 0 and (stderr.is_terminal or not json_summary):
        title = f"top {len(summary['top'])} of {summary['scored']} scored prompts"
        _table_console().print(_top_table(summary["top"], title, summary["threshold"]))
    flagged = summary["flagged"]
    _say(
        f"{summary['rows']} rows, {summary['scored']} scored, {summary['skipped_empty']} empty, "
        f"{'no threshold' if flagged is None else f'{flagged} flagged'}, "
        f"{summary['prompts_per_second']} prompts/s -> {summary['output']}{_cached(summary)}{_since(summary)}"
    )
    if fail_on_flagged and flagged:
        raise FlaggedPromptsError(f"{flagged} prompts flagged")
    newly = (summary.get("changes") or {}).get("newly_flagged")
    if fail_on_new_flagged and newly:
        raise FlaggedPromptsError(f"{newly} prompts newly flagged since {previous}")


def _cached(summary: dict[str, Any]) -> str:
    """The closing line's tail with --cache: rows read from the score cache and rows scored."""
    cache = summary.get("cache")
    return "" if not cache else f"; cache: {cache['reused']} rows reused, {cache['scored']} scored"


def _since(summary: dict[str, Any]) -> str:
    """The closing line's tail with --previous: what changed since the last audit."""
    if "changes" not in summary:
        return ""
    changes = summary["changes"]
    if changes is None:
        return "; not compared with --previous: the run is not complete"
    from memscan.diff import counts_line

    return f"; since {changes['previous']}: {counts_line(changes)}"


def _report_run(summary: dict[str, Any], json_summary: bool) -> None:
    """The closing line of a run-directory attempt (and the JSON summary on request)."""
    if json_summary:
        typer.echo(json.dumps(summary, indent=2))
    flagged = summary["flagged"]
    _say(
        f"{summary['done']}/{summary['shards']} shards done, {summary['failed']} failed, "
        f"{summary['rows_done']}/{summary['rows']} rows, {summary['failed_rows']} failed rows, "
        f"{'no threshold' if flagged is None else f'{flagged} flagged'} -> {summary['run_dir']}{_cached(summary)}"
        f"{_since(summary)}"
    )


@app.command("status", epilog="\b\nExample:\n  memscan status audit/ --json")
def run_status(
    run_dir: Annotated[str, typer.Argument(help="A run directory made by `memscan detect -o DIR` or `memscan mitigate -o DIR` (a path or URL).")],
    json_summary: Annotated[bool, typer.Option("--json", help="Print the status as JSON on stdout.")] = False,
    storage_option: StorageOptions = None,
) -> None:
    """Planned, done, failed and pending shards, rows, rate and ETA of a run directory."""
    with cli_errors():
        _storage_options(storage_option)
        from memscan.run import RunDirectory, summarize_run

        summary = summarize_run(RunDirectory(run_dir))
        if json_summary:
            typer.echo(json.dumps(summary, indent=2))
            return
        from memscan.run.progress import status_lines

        for line in status_lines(summary):  # in words: durations, no nulls; plain text, never markup
            typer.echo(line)


@app.command("merge", epilog="\b\nExample:\n  memscan merge audit/ -o scores.parquet")
def merge(
    run_dir: Annotated[str, typer.Argument(help="A run directory made by `memscan detect -o DIR` or `memscan mitigate -o DIR` (a path or URL).")],
    output: Annotated[str, typer.Option("-o", "--output", help="The merged scores (or rewrites) .parquet file (a path or URL).")],
    partial: Annotated[bool, typer.Option("--partial", help="Merge the done shards of an unfinished run.")] = False,
    if_exists: IfExistsFileOption = "fail",
    storage_option: StorageOptions = None,
) -> None:
    """Merge a run directory's shards into one scores file (in input order)."""
    with cli_errors():
        _storage_options(storage_option)
        from memscan.run.merge import merge_run

        rows = merge_run(run_dir, output, allow_partial=partial, if_exists=if_exists)
        _say(f"{rows} rows -> {output}")


@app.command("diff", epilog="\b\nExample:\n  memscan diff yesterday.parquet today.parquet --json --fail-on-new-flagged")
def diff_cmd(
    old: Annotated[str, typer.Argument(help="The earlier audit: a scores .parquet file or a detect run directory (a path or URL).")],
    new: Annotated[str, typer.Argument(help="The later audit: a scores .parquet file or a detect run directory (a path or URL).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the changes as JSON on stdout: counts, then each category's entries.")] = False,
    limit: Annotated[int | None, typer.Option(help="At most N entries per category (default: 10 in the table, all in --json).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 2, not warn, when the two were scored differently (model, threshold, ...).")] = False,
    fail_on_new_flagged: Annotated[bool, typer.Option("--fail-on-new-flagged", help=f"Exit {EXIT_FLAGGED} when a prompt is newly flagged.")] = False,
    storage_option: StorageOptions = None,
) -> None:
    """What changed between two audits, matched by prompt_id: newly flagged, no longer flagged, added, removed, unscored."""
    with cli_errors():
        _storage_options(storage_option)
        from memscan.diff import check_strict, diff_scores

        result = diff_scores(old, new)
        if strict:
            check_strict(result)
        for warning in result.warnings:
            _say(f"memscan: warning: {warning}")
        if json_out:
            typer.echo(json.dumps(result.to_dict(limit), indent=2))
        if not json_out or stderr.is_terminal:
            _table_console().print(_diff_table(result, 10 if limit is None else limit))
        _say(f"memscan: {old} -> {new}: {result.line()}")
        if fail_on_new_flagged and result.counts["newly_flagged"]:
            raise typer.Exit(EXIT_FLAGGED)


def _diff_table(result: Any, limit: int) -> Table:
    """Newly flagged, no longer flagged, unscored, added and removed prompts, `limit` of each."""
    from rich.text import Text

    from memscan.diff import entries

    def cell(score: Any, flagged: Any, status: Any) -> str:
        if status is None:
            return "-"
        if status != "ok":
            return str(status)
        return f"{score:.4f}" + (" flagged" if flagged else "")

    def line(value: Any, width: int) -> Text:
        flat = " ".join(str("" if value is None else value).split())
        return Text(flat if len(flat) <= width else flat[: width - 1] + "…", no_wrap=True)

    table = Table(title=Text(f"changes {result.old_source} -> {result.new_source}"), title_justify="left")
    for column in ("change", "prompt_id", "old", "new", "prompt"):
        table.add_column(column, no_wrap=column != "prompt", overflow="ellipsis")
    for name in ("newly_flagged", "no_longer_flagged", "unscored", "added", "removed"):
        frame = result.frames[name]
        for e in entries(frame.head(limit)):
            table.add_row(name.replace("_", " "), line(e["prompt_id"], 40), cell(e["old_score"], e["old_flagged"], e["old_status"]),
                          cell(e["new_score"], e["new_flagged"], e["new_status"]), line(e["prompt"], 80))
        if len(frame) > limit:
            table.add_row(name.replace("_", " "), f"... {len(frame) - limit} more", "", "", "")
    return table


@app.command("models", epilog="\b\nExample:\n  memscan models")
def list_models() -> None:
    """List the shipped model profiles."""
    with cli_errors():
        from memscan.models.profiles import available_profiles, load_profile

        table = Table(title="model profiles")
        for column in ("name", "model", "weights", "norm scale", "threshold"):
            table.add_column(column, no_wrap=True)
        sources = []
        for name in available_profiles():
            p = load_profile(name)
            kind = "v" if p.prediction_type == "v_prediction" else "eps"
            if kind == "v":
                kind += " (raw)" if p.v_convention == "raw" else " (as eps)"
            table.add_row(*map(_text, (name, f"{kind} {p.resolution}", f"{p.w_norm:g} / {p.w_align:g}",
                                       "-" if p.norm_scale == "none" else p.norm_scale,
                                       "-" if p.threshold is None else f"{p.threshold:.4g}")))
            sources.append(f"  {name}: {_shown_source(p.source)}")
        Console().print(table)
        typer.echo("sources:\n" + "\n".join(sources))


def _shown_source(source: str) -> str:
    """A profile's source as a person reads it: bundled folders by their place in the data folder."""
    from memscan.paths import data_dir

    try:
        return f"bundled {Path(source).resolve().relative_to(data_dir().resolve())}"
    except (ValueError, OSError):
        return source


def _table_console() -> Console:
    """stderr, 120 columns wide when it is not a terminal (logs and CI keep whole rows)."""
    return stderr if stderr.is_terminal else Console(stderr=True, width=120)


def _evaluation_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One line per method, target FPR and convention: TPR, the FPR reached and its threshold."""
    table = Table(title=_text(title), title_justify="left")
    for column in ("method", "mem", "not", "AUC", "target FPR", "convention", "TPR", "FPR", "threshold"):
        table.add_column(column, justify="left" if column in ("method", "convention") else "right")
    for row in rows:
        first = True
        for target, by_convention in row["tpr_at_fpr"].items():
            for convention, p in by_convention.items():
                head = (_text(row["name"]), str(row["n_memorized"]), str(row["n_not_memorized"]), f"{row['auc']:.3f}")
                table.add_row(*(head if first else ("", "", "", "")), f"{float(target):.0%}", convention,
                              f"{p['tpr']:.3f}", f"{p['fpr']:.3f}", f"> {p['threshold']:.6g}")
                first = False
        table.add_section()
    return table


def _bench_table(rows: list[dict[str, Any]], title: str) -> Table:
    """The papers' Table 1 layout: AUC, TPR@FPR (both conventions), seconds and UNet evaluations per prompt."""
    table = Table(title=_text(title), title_justify="left")
    table.add_column("method")
    table.add_column("AUC", justify="right")
    keys = [(t, c) for t, by in rows[0]["tpr_at_fpr"].items() for c in by]
    for target, convention in keys:
        table.add_column(f"TPR@{float(target):.0%}\n{convention}", justify="right")
    table.add_column("s/prompt", justify="right")
    table.add_column("UNet/prompt", justify="right")
    for row in rows:
        tprs = [f"{row['tpr_at_fpr'][t][c]['tpr']:.3f}" for t, c in keys]
        table.add_row(_text(row["name"]), f"{row['auc']:.3f}", *tprs, f"{row['seconds_per_prompt']:.3g}",
                      str(row["unet_evals_per_prompt"]))
    return table


@app.command("evaluate", epilog="\b\nExample:\n  memscan evaluate scores.parquet wen.parquet --labels prompts.csv --json")
def evaluate_cmd(
    scores: Annotated[list[str], typer.Argument(metavar="SCORES...", help="Scores Parquet files (one per method; paths or URLs).")],
    labels: Annotated[str | None, typer.Option(help="Labels: any prompt file with a label column (1/0, memorized/not_memorized); joined on prompt_id, else prompt text (default: a label column in SCORES).")] = None,
    label_column: LabelColumnOption = "label",
    column: Annotated[list[str] | None, typer.Option("--column", help="Score column(s) to evaluate, e.g. --column norm --column alignment (default: score).")] = None,
    target_fpr: Annotated[list[float] | None, typer.Option("--target-fpr", help="Target FPR(s) (default: 0.01 and 0.03).")] = None,
    json_out: JsonOutOption = False,
    storage_option: StorageOptions = None,
) -> None:
    """ROC AUC and TPR at 1%/3% FPR (closest point and Wen et al.'s strictly-below point) with thresholds."""
    with cli_errors():
        _storage_options(storage_option)
        from memscan.evaluate import DEFAULT_TARGETS, evaluate_files

        rows = evaluate_files(scores, labels, columns=column or ["score"], targets=target_fpr or DEFAULT_TARGETS,
                              label_column=label_column)
        if json_out:
            typer.echo(json.dumps(rows, indent=2))
        _table_console().print(_evaluation_table(rows, "detection on labelled prompts (closest: reference code; below: Wen et al.)"))


@app.command("calibrate", epilog=(
    "\b\nExample:\n  memscan calibrate cal.parquet --labels labelled.csv -o my-model.toml --holdout 0.3"
))
def calibrate_cmd(
    scores: Annotated[str, typer.Argument(metavar="SCORES", help="Scores Parquet file of labelled prompts (anisotropy: norm and alignment columns; a path or URL).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Profile TOML to write (a path or URL); use it as `detect --model FILE.toml` (a local file: copy one from a store first).")],
    labels: Annotated[str | None, typer.Option(help="Labels file (see `evaluate`) (default: a label column in SCORES).")] = None,
    label_column: LabelColumnOption = "label",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Profile to start from (default: the one the scores were made with).")] = None,
    target_fpr: Annotated[float, typer.Option("--target-fpr", help="Share of clean prompts allowed above the threshold.")] = 0.01,
    confidence: Annotated[float, typer.Option(help="Probability that the FPR on new clean prompts stays within the target.")] = 0.9,
    fit: Annotated[bool, typer.Option("--fit/--no-fit", help="Fit w_norm and w_align by logistic regression (else keep the scores' weights).")] = True,
    holdout: Annotated[float, typer.Option(help="Share of labelled prompts kept aside to measure FPR/TPR on (stratified; whole groups with --group-column/--groups).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the holdout split.")] = 0,
    group_column: Annotated[str | None, typer.Option("--group-column", help="Column (of the labels file, else SCORES) naming each prompt's caption family: the guarantee counts families, the holdout keeps them whole.")] = None,
    groups: Annotated[str | None, typer.Option("--groups", help="auto: caption families found from the prompt text (word-set Jaccard >= 0.7, or the same caption without digits and punctuation), used as --group-column.")] = None,
    search_timesteps: Annotated[bool, typer.Option("--search-timesteps", help="Also choose the DDIM steps the norm and the alignment are read at (loads the model, rescores the prompts at 11 steps of the schedule; keeps the profile's pair unless another is better on the calibration side).")] = False,
    device: DeviceOption = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the calibration as JSON on stdout.")] = False,
    if_exists: IfExistsFileOption = "fail",
    storage_option: StorageOptions = None,
) -> None:
    """Fit the term weights and the threshold at a target FPR on clean prompts; write a profile."""
    with cli_errors():
        _storage_options(storage_option)
        from memscan.evaluate import calibrate_scores

        if groups not in (None, "auto"):
            raise UsageError(f"--groups {groups!r}: the only value is auto (or name a column with --group-column)")
        profile, result = calibrate_scores(
            scores, output, labels_path=labels, model=model, target_fpr=target_fpr, confidence=confidence, fit=fit, holdout=holdout,
            seed=seed, label_column=label_column, if_exists=if_exists, group_column=group_column, auto_groups=groups == "auto",
            search_timesteps=search_timesteps, device=device, log=_say,
        )
        if json_out:
            typer.echo(json.dumps({"profile": str(output), **result.to_dict()}, indent=2))
        weights = "" if result.w_norm is None else f"w_norm {result.w_norm:.4g}, w_align {result.w_align:.4g}, "
        if result.timestep_search is not None:
            found = result.timestep_search
            weights = (f"steps t_hi {result.t_hi_index}, t_lo {result.t_lo_index} of {found['candidates']} pairs "
                       f"(ROC TPR@{target_fpr:g} {found['tpr']:.3f}, AUC {found['auc']:.3f}; the profile's pair: ROC TPR "
                       f"{found['default_tpr']:.3f}, "
                       f"AUC {found['default_auc']:.3f}), " + weights)
        held = result.holdout
        _say(
            f"{weights}threshold {result.threshold:.6g}: FPR {result.fpr:.3f} (target {target_fpr:g}), "
            f"TPR {result.tpr if result.tpr is None else round(result.tpr, 3)} on {result.n_clean} clean / "
            f"{result.n_memorized} memorized prompts"
            + (f"; held out: FPR {held['fpr']:.3f}, TPR {held['tpr']:.3f}" if held and held["tpr"] is not None else "")
            + (f", AUC {held['auc']:.3f}, ROC TPR@{target_fpr:g} {held['roc_tpr_at_target_fpr']:.3f}"
               if held and held.get("auc") is not None else "")
            + f" -> {output}"
        )
        if result.groups is not None:
            _say(f"caption families ({result.groups}): {result.group_fpr:.3f} of {result.n_clean_groups} clean families "
                 f"have a member above the threshold (target {target_fpr:g})"
                 + (f"; held out: {held['group_fpr']:.3f} of {held['n_clean_groups']} families, prompt FPR {held['fpr']:.3f}"
                    if held and held.get("group_fpr") is not None else ""))
        for warning in result.warnings:
            _say(f"memscan: warning: {warning}")
        facts = profile.calibration
        _say(f"use it as: memscan detect PROMPTS --model {output} (its method {facts.get('method', 'anisotropy')}, "
             f"n_noise {facts.get('n_noise', 1)} and seed {facts.get('seed', 51)} are the defaults there; "
             "the threshold holds for these only)")
        if not result.guaranteed:
            from memscan.evaluate import min_clean_prompts

            what = "clean prompts" if result.groups is None else "clean caption families"
            count = result.n_clean if result.groups is None else result.n_clean_groups
            _say(f"memscan: warning: {count} {what} are too few to bound the FPR at {target_fpr:g} "
                 f"with confidence {confidence:g} (need {min_clean_prompts(target_fpr, confidence)}); "
                 "the threshold is just above the largest clean score")


@app.command("report", epilog=(
    "\b\nExamples:\n"
    "  memscan report scores.parquet wen.parquet --labels prompts.csv -o report.html\n"
    "  memscan report --guard-check guard.json -o guard.html   # python -m memscan.guard_check --json guard.json"
))
def report_cmd(
    scores: Annotated[list[str] | None, typer.Argument(metavar="[SCORES]...", help="Scores Parquet files (one per method; paths or URLs).")] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="HTML file to write (a path or URL).")] = "report.html",
    labels: Annotated[str | None, typer.Option(help="Labels file (see `evaluate`) for histograms by class and ROC curves.")] = None,
    label_column: LabelColumnOption = "label",
    threshold: Annotated[float | None, typer.Option(help="Threshold to draw (default: the one the scores were flagged with).")] = None,
    top: Annotated[int, typer.Option(help="Top-scored prompts listed per method.")] = 20,
    title: Annotated[str, typer.Option(help="Page title.")] = "memscan report",
    guard_check: Annotated[list[str] | None, typer.Option("--guard-check", help="A `python -m memscan.guard_check --json` summary: its policy table and the copy rate vs agreement plot (repeatable: one point per policy and file).")] = None,
    if_exists: IfExistsFileOption = "fail",
    storage_option: StorageOptions = None,
) -> None:
    """One self-contained HTML page: histograms, ROC curves, threshold, top flagged prompts; guard checks."""
    with cli_errors():
        _storage_options(storage_option)
        from memscan.report import load_guard_checks, load_report_inputs, write_report

        scores, guard_check = scores or [], guard_check or []
        if not scores and not guard_check:
            raise UsageError("report: give SCORES files, --guard-check files, or both")
        inputs = [*scores, *guard_check, *([labels] if labels is not None else [])]
        check_output(output, inputs=inputs, if_exists=if_exists, what="report")  # before reading anything
        checks = load_guard_checks(guard_check)
        items = load_report_inputs(scores, labels=labels, label_column=label_column, threshold=threshold)
        page = write_report(items, output, inputs=inputs, if_exists=if_exists, title=title, top=top,
                            guard_checks=checks)
        _say(f"report -> {page}")


@app.command("bench", cls=MethodsCommand, epilog=(
    "\b\nExamples:\n"
    "  memscan bench --model sd-v1-4 --device cuda --methods anisotropy,wen\n"
    "  memscan bench --model demo --out-dir bench/ --report bench.html\n"
    "  memscan bench --model demo --methods anisotropy,norm --w-align 0   # weights as in detect (anisotropy only)"
))
def bench_cmd(
    model: ModelOption = "demo",
    suite: Annotated[str | None, typer.Option(help="sd1 (sd1_mem vs sd1_nmem), sd2 (sd2_mem vs sd1_nmem), demo, or a prompt file with a label column (default: by model).")] = None,
    methods: Annotated[str, typer.Option(help=f"Comma-separated method specs of {METHODS_PLACEHOLDER}, options as NAME:key=value, e.g. anisotropy,wen:steps=10.")] = "anisotropy,wen,norm,alignment,sharpness",
    limit: Annotated[int | None, typer.Option(help="At most this many prompts of each class (seeded sample).")] = None,
    n_noise: NNoiseOption = None,
    seed: SeedOption = None,
    batch_size: BatchSizeOption = 16,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    w_norm: WNormOption = None,
    w_align: WAlignOption = None,
    v_convention: VConventionOption = None,
    norm_scale: NormScaleOption = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Write one scores Parquet per method and labels.csv here.")] = None,
    report: Annotated[Path | None, typer.Option(help="Also write the HTML report here.")] = None,
    json_out: JsonOutOption = False,
    if_exists: IfExistsFileOption = "fail",
) -> None:
    """The public benchmark (or the demo's labelled prompts) for every method: AUC, TPR@FPR, speed."""
    with cli_errors():
        from memscan.bench import check_bench_settings, run_bench

        specs = [m.strip() for m in methods.split(",") if m.strip()]
        check_bench_settings(specs, suite=suite, limit=limit, n_noise=n_noise, batch_size=batch_size, out_dir=out_dir,
                             report=report, if_exists=if_exists, w_norm=w_norm, w_align=w_align,
                             v_convention=v_convention, norm_scale=norm_scale)  # before the model loads
        suite_name, results = run_bench(
            model, methods=specs, suite=suite, limit=limit, n_noise=n_noise, seed=seed, batch_size=batch_size,
            device=device, dtype=dtype, out_dir=out_dir, if_exists=if_exists, w_norm=w_norm, w_align=w_align,
            v_convention=v_convention, norm_scale=norm_scale,
        )
        rows = [{**r.to_dict(), "name": r.method} for r in results]
        n_noise = results[0].facts.get("n_noise", n_noise)  # the profile's calibration n_noise when not given
        for r in results:
            if len(r.failed):
                _say(f"memscan: warning: {r.method}: {len(r.failed)} prompts not scored, left out "
                     f"({r.failed['status'].iloc[0]}: {r.failed['error'].iloc[0]})")
        if json_out:
            typer.echo(json.dumps({"model": model, "suite": suite_name, "n_noise": n_noise, "results": rows}, indent=2))
        _table_console().print(_bench_table(rows, f"bench: {model} on {suite_name} ({rows[0]['n_memorized']} memorized, {rows[0]['n_not_memorized']} not), n_noise={n_noise}"))
        if report is not None:
            from memscan.report import ReportInput, write_report

            items = [ReportInput(r.method, r.scores, r.facts, r.facts.get("threshold")) for r in results]
            _say(f"report -> {write_report(items, report, if_exists=if_exists, title=f'memscan bench: {model} on {suite_name}')}")


@app.command("mitigate", epilog=(
    "\b\nExamples:\n"
    "  memscan mitigate scores.parquet -o rewritten.parquet --emit-embeddings embeds.safetensors\n"
    "  memscan mitigate audit/shards/ -o rewrites/ --gpus all   # a run directory"
))
def mitigate_cmd(
    input_path: Annotated[str, typer.Argument(metavar="INPUT", help="Prompts (CSV, TSV, Parquet, JSONL, TXT, tar shards, hf-dataset:NAME) or a `detect` output Parquet (its flagged rows), a local path or URL; a folder, prefix or glob for a run directory.")],
    output: Annotated[str | None, typer.Option("-o", "--output", help="A .parquet file, or a run directory (sharded, resumable): an existing directory, a path ending in '/', or a name with no suffix; other suffixes are refused (default: INPUT-NAME.mitigated.parquet).")] = None,
    model: ModelOption = "demo",
    target: Annotated[float | None, typer.Option(help="Rewrite until the score is below this (default: the profile's threshold).")] = None,
    min_similarity: Annotated[float, typer.Option("--min-similarity", help="Least text similarity (see --similarity) of a rewrite to the original.")] = 0.8,
    beam_width: Annotated[int, typer.Option("--beam-width", help="Candidates kept per round (half by score, half by similarity).")] = 4,
    max_edits: Annotated[int, typer.Option("--max-edits", help="Most edits in one rewrite (search rounds).")] = 4,
    similarity: Annotated[str | None, typer.Option(help="What measures --min-similarity: pooled (CLIP's EOS state), tokens (mean of the token states), or a CLIP text model to judge with, a folder or hub id (default: the profile's).")] = None,
    prefer: Annotated[str, typer.Option(help="Which rewrite of a round wins: score (the lowest, farthest from memorized) or similarity (the closest).")] = "score",
    substitute_words: Annotated[str, typer.Option("--substitute-words", help="Where substitutes come from: english (frequent English words, shipped), a word-list file (one word per line, e.g. your captions' vocabulary), or embedding (the text encoder's token-table neighbours); words are ranked by --similarity.")] = "english",
    verify_noise: Annotated[int, typer.Option("--verify-noise", help="Noises of an independent bank that must also score a rewrite under the target; 0 = off.")] = 4,
    all_rows: Annotated[bool, typer.Option("--all", help="From a detect output, take every row, not only the flagged ones.")] = False,
    emit_embeddings: Annotated[str | None, typer.Option("--emit-embeddings", help="Also optimise each prompt's embedding; save them here (safetensors, by prompt_id; a path or URL).")] = None,
    embedding_steps: Annotated[int, typer.Option("--embedding-steps", help="Most AdamW steps (lr 0.05) of the embedding optimisation.")] = 50,
    embedding_depth: Annotated[float, typer.Option("--embedding-depth", help="Aim the embedding this share of its starting gap under the target (0: just under), confirmed under the target on the independent bank.")] = 0.0,
    embedding_late: Annotated[float | None, typer.Option("--embedding-late", help="Also save a late embedding per prompt, re-optimised on partly denoised latents at this share of the steps (e.g. 0.6) and used from there on (for models that settle copies late; see the README).")] = None,
    generation_steps: Annotated[int, typer.Option("--generation-steps", help="With --embedding-late: the DDIM steps of the generation it is made for.")] = 50,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", help="With --embedding-late: the generation's classifier-free guidance.")] = 7.5,
    n_noise: NNoiseOption = None,
    seed: SeedOption = None,
    batch_size: BatchSizeOption = 16,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    w_norm: WNormOption = None,
    w_align: WAlignOption = None,
    v_convention: VConventionOption = None,
    norm_scale: NormScaleOption = None,
    architecture: ArchitectureOption = None,
    allow_pickle: AllowPickleOption = False,
    prompt_column: PromptColumnOption = None,
    id_column: IdColumnOption = None,
    if_exists: IfExistsOption = None,
    shard_size: ShardSizeOption = 10_000,
    workers: WorkersOption = None,
    gpus: GpusOption = None,
    executor: ExecutorOption = "local",
    log_interval: LogIntervalOption = 60.0,
    json_summary: JsonSummaryOption = False,
    storage_option: StorageOptions = None,
) -> None:
    """Rewrite memorized prompts into close ones that score under the threshold."""
    with cli_errors():
        _storage_options(storage_option)
        from memscan.config import DetectSettings
        from memscan.mitigation import MitigateSettings, mitigate

        settings = MitigateSettings(
            detect=DetectSettings(model=model, n_noise=n_noise, seed=seed, batch_size=batch_size, device=device,
                                  dtype=dtype, w_norm=w_norm, w_align=w_align, v_convention=v_convention,
                                  norm_scale=norm_scale,
                                  architecture=architecture, allow_pickle=allow_pickle,
                                  prompt_column=prompt_column, id_column=id_column),
            target=target, min_similarity=min_similarity, beam_width=beam_width, max_edits=max_edits,
            verify_noise=verify_noise, similarity=similarity, prefer=prefer, substitute_words=substitute_words,
            all_rows=all_rows, emit_embeddings=emit_embeddings, embedding_steps=embedding_steps,
            embedding_depth=embedding_depth, embedding_late=embedding_late, generation_steps=generation_steps,
            guidance_scale=guidance_scale,
        )
        default = _default_output(input_path).name.removesuffix(".scores.parquet") + ".mitigated.parquet"
        output = output or default
        if output_kind(output) == "run":
            from memscan.mitigation.run import run_mitigate
            from memscan.run import RunOptions

            options = RunOptions(shard_size=shard_size, if_exists=if_exists or "resume")
            outcome = run_mitigate(input_path, output, settings, options, executor=executor, workers=workers,
                                   gpus=gpus, log_interval=log_interval)
            _report_mitigate_run(outcome.summary, json_summary)
            raise typer.Exit(outcome.exit_code)
        if gpus or workers or executor != "local":
            raise UsageError("--gpus, --workers and --executor need a run directory (-o DIR)")
        from memscan.progress import Progress

        progress = Progress(interval=log_interval, stream=sys.stderr)
        s = mitigate(input_path, output, settings, if_exists=if_exists or "fail", progress=progress).summary
        if json_summary:
            typer.echo(json.dumps(s, indent=2))
        _say(
            f"{s['rows']} rows, {s['attempted']} above {s['target']:.4g}: {s['ok']} rewritten, "
            f"{s['unresolved']} unresolved; {s['seconds_per_prompt']} s/prompt -> {s['output']}"
        )


def _report_mitigate_run(summary: dict[str, Any], json_summary: bool) -> None:
    """The closing line of a mitigate run-directory attempt (and the JSON summary on request)."""
    if json_summary:
        typer.echo(json.dumps(summary, indent=2))
    attempted = summary["flagged"]
    per_prompt = round(summary["seconds_search"] / attempted, 4) if attempted else None
    _say(
        f"{summary['done']}/{summary['shards']} shards done, {summary['failed']} failed, "
        f"{summary['rows_done']}/{summary['rows']} rows, {attempted} above {summary['target']:.4g}: "
        f"{summary['rewritten']} rewritten, {summary['unresolved']} unresolved; {per_prompt} s/prompt "
        f"-> {summary['run_dir']}"
    )


@app.command("confirm", epilog=(
    "\b\nExamples:\n"
    "  memscan confirm candidates.csv --model ./my-model -o labels.csv --embedder openai/clip-vit-base-patch32\n"
    "  memscan confirm data/demo/prompts.csv -o labels.csv --embedder vae --contact-sheet sheet.html\n"
    "  memscan confirm candidates.csv --model sd-v1-4 -o confirm/ --gpus all --train-images laion-subset.parquet"
))
def confirm_cmd(
    input_path: Annotated[str, typer.Argument(metavar="PROMPTS", help="Candidate prompts: CSV, TSV, Parquet, JSONL, TXT (optionally .gz), tar shards or hf-dataset:NAME, a local path or URL; a folder, prefix or glob for a run directory.")],
    output: Annotated[str | None, typer.Option("-o", "--output", help="A labelled .csv or .parquet file, or a run directory (sharded, resumable): an existing directory, a path ending in '/', or a name with no suffix (default: PROMPTS-NAME.labels.csv).")] = None,
    model: VaeModelOption = "demo",
    k: Annotated[int, typer.Option("--k", "-k", help="Generations per prompt, from seeds SEED, SEED+1, ...")] = 4,
    embedder: Annotated[str, typer.Option(help="Image similarity: pixel (downsampled pixels), vae (the model's own VAE latents), or a CLIP/DINO vision model, a folder or cached hub id (cosine).")] = "vae",
    threshold: Annotated[float | None, typer.Option(help="Near-duplicate distance (default per embedder: pixel 0.018, vae 0.054, a model 0.05 cosine).")] = None,
    min_cluster: Annotated[int | None, typer.Option("--min-cluster", help="Generations that must be one image (or match one training image) (default: half of k, at least 2).")] = None,
    train_images: Annotated[Path | None, typer.Option("--train-images", help="Training images to match: a folder of images, a .parquet (image bytes column) or an .npz (images array).")] = None,
    train_roundtrip: Annotated[bool, typer.Option("--train-roundtrip/--no-train-roundtrip", help="Compare generations with the training images' round trip through the model's VAE (the closest image it can make), not the raw images.")] = True,
    contact_sheet: Annotated[str | None, typer.Option("--contact-sheet", help="Also write an HTML page of each prompt's generations and its training match (a path or URL).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the first generation.")] = 0,
    steps: StepsOption = 50,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per pipeline call (halved on out-of-memory).")] = 16,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    architecture: ArchitectureOption = None,
    allow_pickle: AllowPickleOption = False,
    prompt_column: PromptColumnOption = None,
    id_column: IdColumnOption = None,
    store_prompt: StorePromptOption = True,
    if_exists: IfExistsOption = None,
    shard_size: ShardSizeOption = 10_000,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Label again only rows whose status is not ok (run directories).")] = False,
    workers: WorkersOption = None,
    gpus: GpusOption = None,
    executor: ExecutorOption = "local",
    log_interval: LogIntervalOption = 60.0,
    json_summary: JsonSummaryOption = False,
    storage_option: StorageOptions = None,
) -> None:
    """Label prompts memorized or not from k generations each: a labelled file for `memscan calibrate`."""
    with cli_errors():
        _storage_options(storage_option)
        from memscan.config import DetectSettings
        from memscan.confirm.core import ConfirmSettings, confirm, file_output

        settings = ConfirmSettings(
            detect=DetectSettings(model=model, batch_size=1, device=device, dtype=dtype, architecture=architecture,
                                  allow_pickle=allow_pickle, prompt_column=prompt_column, id_column=id_column,
                                  store_prompt=store_prompt),
            k=k, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size, embedder=embedder,
            threshold=threshold, min_cluster=min_cluster, train_images=None if train_images is None else str(train_images),
            train_roundtrip=train_roundtrip,
        )
        output = output or _default_output(input_path).name.removesuffix(".scores.parquet") + ".labels.csv"
        if not file_output(output):
            from memscan.confirm.run import run_confirm
            from memscan.run import RunOptions

            options = RunOptions(shard_size=shard_size, if_exists=if_exists or "resume", retry_errors=retry_errors)
            outcome = run_confirm(input_path, output, settings, options, executor=executor, workers=workers, gpus=gpus,
                                  log_interval=log_interval, contact_sheet=contact_sheet)
            s = outcome.summary
            if json_summary:
                typer.echo(json.dumps(s, indent=2))
            _say(f"{s['done']}/{s['shards']} shards done, {s['failed']} failed, {s['rows_done']}/{s['rows']} rows: "
                 f"{s['memorized']} memorized, {s['not_memorized']} not memorized, {s['failed_rows']} failed; "
                 f"threshold {s['threshold']:g} ({s['embedder']}), k {s['k']}, min_cluster {s['min_cluster']} "
                 f"-> {s['run_dir']} (memscan merge {s['run_dir']} -o labels.parquet)")
            raise typer.Exit(outcome.exit_code)
        if gpus or workers or executor != "local" or retry_errors:
            raise UsageError("--gpus, --workers, --executor and --retry-errors need a run directory (-o DIR)")
        from memscan.progress import Progress

        progress = Progress(interval=log_interval, stream=sys.stderr)
        s = confirm(input_path, output, settings, if_exists=if_exists or "fail", contact_sheet=contact_sheet,
                    progress=progress).summary
        if json_summary:
            typer.echo(json.dumps(s, indent=2))
        gap = s["distance_gap"]
        _say(f"{s['rows']} rows: {s['memorized']} memorized, {s['not_memorized']} not memorized, "
             f"{s['skipped_empty']} empty, {s['failed_rows']} failed; threshold {s['threshold']:g} ({s['embedder']}, "
             f"{s['metric']}), k {s['k']}, min_cluster {s['min_cluster']}; decision distance: memorized up to "
             f"{gap['memorized_max']}, not memorized from {gap['not_memorized_min']}, {gap['near_threshold']} "
             f"within 2x of the threshold -> {s['output']}"
             + (f", {s['contact_sheet']}" if s["contact_sheet"] else ""))


@app.command("generate", epilog=(
    "\b\nExamples:\n"
    "  memscan generate prompts.csv -o images/ --guard optimize --num-images-per-prompt 4\n"
    "  memscan generate prompts.csv -o images/ --model sd-v1-4 --guard block --device cuda"
))
def generate_cmd(
    input_path: Annotated[str, typer.Argument(metavar="PROMPTS", help="Prompts: CSV, TSV, Parquet, JSONL or TXT (optionally .gz), a local path or URL.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output directory: images/<id>-<k>.png, decisions.parquet (one row per image), log/ parts; a rerun resumes.")],
    guard: Annotated[str, typer.Option("--guard", help="warn, block, reseed, optimize, rewrite, or off (no scoring).")] = "warn",
    model: VaeModelOption = "demo",
    threshold: Annotated[float | None, typer.Option(help="Flag prompts scoring above this (default: the profile's).")] = None,
    num_images_per_prompt: Annotated[int, typer.Option("--num-images-per-prompt", "-k", help="Images per prompt.")] = 1,
    steps: StepsOption = 50,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", help="Classifier-free guidance scale.")] = 7.5,
    seed: Annotated[int, typer.Option(help="Image k of row r starts from seed + r * K + k.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per guarded pipeline call.")] = 8,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    prompt_column: PromptColumnOption = None,
    id_column: IdColumnOption = None,
    log_interval: LogIntervalOption = 60.0,
    json_summary: JsonSummaryOption = False,
    optimize_late: Annotated[float | None, typer.Option("--optimize-late", help="With --guard optimize: at this share of the steps (e.g. 0.6), optimise the embedding again on the call's own partly denoised latents (for models that settle copies late).")] = None,
) -> None:
    """Generate images through the memorization guard: PNGs and a Parquet log of its decisions."""
    with cli_errors():
        from memscan.generate import GenerateSettings, check_generate_output, generate_images
        from memscan.progress import Progress

        settings = GenerateSettings(
            model=model, guard=guard, threshold=threshold, num_images_per_prompt=num_images_per_prompt, steps=steps,
            guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, device=device, dtype=dtype,
            prompt_column=prompt_column, id_column=id_column, optimize_late=optimize_late,
        )
        settings.check()
        check_generate_output(output, input_path, settings)  # before the model loads
        progress = Progress(interval=log_interval, stream=sys.stderr)
        s = generate_images(input_path, output, settings, progress=progress).summary
        if json_summary:
            typer.echo(json.dumps(s, indent=2))
        actions = ", ".join(f"{n} {a}" for a, n in sorted(s["actions"].items())) or "none"
        _say(f"{s['prompts']} prompts ({s['skipped_done']} done before), {s['images']} images, actions: {actions}, "
             f"{s['errors']} errors, guard {s['guard']} -> {s['output']}")


cache_app = typer.Typer(
    help="Inspect and compact a score cache (detect --cache).", no_args_is_help=True,
    epilog="\b\nExamples:\n  memscan cache info scores-cache/\n  memscan cache compact s3://bucket/memscan-cache/",
)
app.add_typer(cache_app, name="cache")


@cache_app.command("info", epilog="\b\nExample:\n  memscan cache info s3://bucket/memscan-cache/ --json")
def cache_info(
    path: Annotated[str, typer.Argument(metavar="CACHE", help="The cache folder or URL given to detect --cache.")],
    json_summary: JsonCountsOption = False,
    storage_option: StorageOptions = None,
) -> None:
    """Fingerprints (what each scores), rows, segments and bytes of a score cache."""
    with cli_errors():
        _storage_options(storage_option)
        from memscan.cache import ScoreCache

        info = ScoreCache(path).info()
        if json_summary:
            typer.echo(json.dumps(info, indent=2))
            return
        for entry in info["fingerprints"]:
            typer.echo(f"{entry['fingerprint']}  {entry['rows']} rows in {entry['segments']} segments, "
                       f"{entry['bytes']} bytes: model {entry['model']}, {entry['method']}, n_noise {entry['n_noise']}, "
                       f"seed {entry['seed']}, {entry['dtype']}")
        typer.echo(f"{info['cache']}: {len(info['fingerprints'])} fingerprints, {info['rows']} rows, "
                   f"{info['segments']} segments, {info['bytes']} bytes")


@cache_app.command("compact", epilog="\b\nExample:\n  memscan cache compact s3://bucket/memscan-cache/")
def cache_compact(
    path: Annotated[str, typer.Argument(metavar="CACHE", help="The cache folder or URL given to detect --cache.")],
    json_summary: JsonCountsOption = False,
    storage_option: StorageOptions = None,
) -> None:
    """Merge each fingerprint's segments into one (safe while runs append to the cache)."""
    with cli_errors():
        _storage_options(storage_option)
        from memscan.cache import ScoreCache

        result = ScoreCache(path).compact()
        if json_summary:
            typer.echo(json.dumps(result, indent=2))
        _say(f"{result['cache']}: {result['segments_before']} segments -> {result['segments_after']}, "
             f"{result['rows_before']} rows -> {result['rows_after']}, "
             f"{result['bytes_before']} bytes -> {result['bytes_after']}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
