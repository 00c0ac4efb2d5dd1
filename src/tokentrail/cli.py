"""The `tokentrail` command. Thin: every command parses options and calls into the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from tokentrail import __version__
from tokentrail.errors import TokentrailError

app = typer.Typer(
    name="tokentrail",
    help="Trace how a prompt's next-token state moves through a transformer's layers.",
    no_args_is_help=False,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)

DEFAULT_OUT = Path("tokentrail-out")
DEFAULT_PRESET = "seed-categories"

# --- shared options --------------------------------------------------------------------------------------------
PromptsFile = Annotated[
    Optional[Path], typer.Argument(help="Prompts file (.yaml, .json, .csv, .txt). Default: --preset.", show_default=False)
]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="Built-in prompt set (see `tokentrail presets`).")]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="`default`, an embedded model name, a .gguf file, a local directory or a hub id.")
]
RevisionOpt = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model's own Python code to run.")]
DeviceMapOpt = Annotated[Optional[str], typer.Option("--device-map", help="Spread a large model over devices, e.g. auto.")]
ChatOpt = Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the tokenizer's chat template.")]
PositionOpt = Annotated[str, typer.Option(help="Token position to trace: last, all, or an index (0, -2, ...).")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="How many next-token candidates to keep.")]
LensOpt = Annotated[bool, typer.Option("--logit-lens/--no-logit-lens", help="Read out every layer through the final norm and unembedding.")]
TruncateOpt = Annotated[bool, typer.Option("--truncate", help="Keep the last tokens of a prompt longer than the context.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Prompts per forward pass.")]
ShardOpt = Annotated[int, typer.Option("--shard-size", help="Prompts per store shard (the unit of resumption).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run directory.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
RunDirArg = Annotated[Path, typer.Argument(help="A run directory made by `tokentrail run` or `trace`.")]


def _model_settings(model: str, revision, dtype, device, trust_remote_code, device_map):
    from tokentrail.models import resolve_device, resolve_dtype
    from tokentrail.runs import ModelSettings

    resolve_dtype(dtype)  # fail on a typo before anything is traced
    resolve_device(device)
    return ModelSettings(spec=model, revision=revision, dtype=dtype, device=device,
                         trust_remote_code=trust_remote_code, device_map=device_map)


def _trace(prompts_file, preset, model, revision, dtype, device, trust_remote_code, device_map, chat, position,
           top_k, logit_lens, truncate, batch_size, shard_size, out_dir, quiet):
    from tokentrail.prompts import resolve_prompts
    from tokentrail.runs import BatchSettings, trace_run
    from tokentrail.trace import TraceOptions, parse_position

    prompt_set = resolve_prompts(prompts_file, preset, DEFAULT_PRESET)
    parse_position(position)
    options = TraceOptions(position=position, chat=chat, top_k=top_k, logit_lens=logit_lens, truncate=truncate)
    if shard_size < 1:
        raise TokentrailError(f"--shard-size must be at least 1, got {shard_size}")
    settings = _model_settings(model, revision, dtype, device, trust_remote_code, device_map)
    outcome = trace_run(out_dir, prompt_set, settings, options, BatchSettings(batch_size, shard_size),
                        show_progress=not quiet)
    for problem in outcome.report.problems:
        err.print(f"[yellow]warning:[/] {problem}")
    report = outcome.report
    err.print(
        f"traced {report.traced} prompt(s) in {report.forward_passes} forward pass(es), "
        f"{report.reused} read back from the store"
    )
    return outcome


@app.command(epilog="Example: `tokentrail trace --preset seed-spectrum --out runs/spectrum`")
def trace(
    prompts_file: PromptsFile = None,
    preset: PresetOpt = None,
    model: ModelOpt = "default",
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    device_map: DeviceMapOpt = None,
    chat: ChatOpt = False,
    position: PositionOpt = "last",
    top_k: TopKOpt = 5,
    logit_lens: LensOpt = True,
    truncate: TruncateOpt = False,
    batch_size: BatchOpt = 16,
    shard_size: ShardOpt = 64,
    out_dir: OutOpt = DEFAULT_OUT,
    quiet: QuietOpt = False,
) -> None:
    """Trace prompts into a run directory's store (only those not traced before)."""
    _trace(prompts_file, preset, model, revision, dtype, device, trust_remote_code, device_map, chat, position,
           top_k, logit_lens, truncate, batch_size, shard_size, out_dir, quiet)
    out.print(f"store: {out_dir / 'store'}")


@app.command(epilog="Example: `tokentrail run` (embedded model, seed-categories, ./tokentrail-out/)")
def run(
    prompts_file: PromptsFile = None,
    preset: PresetOpt = None,
    model: ModelOpt = "default",
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    device_map: DeviceMapOpt = None,
    chat: ChatOpt = False,
    position: PositionOpt = "last",
    top_k: TopKOpt = 5,
    logit_lens: LensOpt = True,
    truncate: TruncateOpt = False,
    batch_size: BatchOpt = 16,
    shard_size: ShardOpt = 64,
    out_dir: OutOpt = DEFAULT_OUT,
    quiet: QuietOpt = False,
) -> None:
    """Trace what is missing, then run every analysis and figure, and say where the results are."""
    outcome = _trace(prompts_file, preset, model, revision, dtype, device, trust_remote_code, device_map, chat,
                     position, top_k, logit_lens, truncate, batch_size, shard_size, out_dir, quiet)
    trace_result = outcome.trace
    table = Table(title="next token per prompt", show_lines=False)
    for column in ("id", "category", "prompt", "top-1", "p"):
        table.add_column(column)
    for i in range(len(trace_result)):
        table.add_row(trace_result.prompt_ids[i], trace_result.categories[i], trace_result.prompts[i][:50],
                      repr(trace_result.next_tokens[i][0]), f"{trace_result.next_token_probs[i][0]:.3f}")
    out.print(table)
    out.print(f"results: {out_dir.resolve()}")


@app.command(epilog="Example: `tokentrail export tokentrail-out --to states.npz`")
def export(
    run_dir: RunDirArg,
    to: Annotated[Path, typer.Option("--to", help="Target .npz file.")] = Path("tokentrail-export.npz"),
) -> None:
    """Write a run's arrays to an .npz that loads with `np.load(path, allow_pickle=False)`."""
    from tokentrail.runs import export_arrays, load_trace, write_export

    _, trace_result = load_trace(run_dir)
    path = write_export(to, export_arrays(trace_result))
    out.print(f"wrote {path}")


@app.command(epilog="Example: `tokentrail info tokentrail-out`")
def info(run_dir: RunDirArg) -> None:
    """What is in a run: model, prompts, layers, options, sizes."""
    from tokentrail.runs import run_info

    details = run_info(run_dir)
    table = Table(show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in details.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        table.add_row(key, str(value))
    out.print(table)


@app.command(epilog="Example: `tokentrail models`")
def models() -> None:
    """List the embedded models and how to name other models."""
    from tokentrail.models import embedded_models

    table = Table(title="embedded models")
    for column in ("name", "aliases", "installed", "description", "path"):
        table.add_column(column, overflow="fold")
    for row in embedded_models():
        table.add_row(row["name"], row["aliases"], "yes" if row["installed"] else "no", row["description"], row["path"])
    out.print(table)
    out.print("Also accepted by --model: a .gguf file, a local model directory, or a hub id in the local HF cache.")


@app.command(epilog="Example: `tokentrail presets`")
def presets() -> None:
    """List the built-in prompt sets."""
    from tokentrail.prompts import load_preset, preset_names

    table = Table(title="presets")
    for column in ("name", "prompts", "categories", "description"):
        table.add_column(column, overflow="fold")
    for name in preset_names():
        preset = load_preset(name)
        table.add_row(name, str(len(preset)), str(len(set(preset.categories))), preset.description)
    out.print(table)


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"tokentrail {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True)] = False,
) -> None:
    if debug:
        os.environ["TOKENTRAIL_DEBUG"] = "1"


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("TOKENTRAIL_DEBUG") == "1"
    try:
        app(args=args, prog_name="tokentrail", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        err.print("interrupted; rerun the same command to resume (traced shards are kept)")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted; rerun the same command to resume (traced shards are kept)")
        return 130
    except TokentrailError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - last resort: still one line, with the way to see more
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: unexpected {type(exc).__name__}: {first} (rerun with --debug for details)", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())
