"""What every stage script shares: the typer app, one-line errors, exit codes, and common options."""
from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.allocator import keep_freed_memory
from core.console import console, errors
from core.cores import adjust_threads, share
from core.errors import Interrupted, PipelineError
from core.training import TrainOptions

__all__ = ["console", "errors"]  # the scripts print through these


def make_app(help: str) -> typer.Typer:
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=help)


def stage(fn: Callable) -> Callable:
    """Turn a stage's expected failures into one line on stderr and an exit code: 2 for bad input,
    130 for an interruption (after its checkpoint is written). The stage runs with glibc keeping freed memory
    (core.allocator) and its share of the cores (core.cores)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        keep_freed_memory()
        try:
            check_out_dir(kwargs.get("out_dir"))
            with share:
                return fn(*args, **kwargs)
        except PipelineError as e:
            errors.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except Interrupted as e:
            errors.print(f"interrupted: {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(130)
        except KeyboardInterrupt:
            errors.print("interrupted", highlight=False)
            raise typer.Exit(130)
        except MemoryError:
            errors.print("[red]error:[/red] out of memory; lower --batch-size", highlight=False)
            raise typer.Exit(2)
    return wrapper


def check_out_dir(out_dir: Path | None) -> None:
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"--out-dir {out_dir} is a file, not a folder")


def track(items, description: str):
    """A rich progress bar over a sized iterable."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for item in progress.track(items, description=description):
            adjust_threads()
            yield item


# Options shared by the stages, declared once.
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or mps")]
Seed = Annotated[int, typer.Option(help="seed for every random choice")]
DatasetPath = Annotated[Path, typer.Option(help="dataset.json to read")]
OutDir = Annotated[Path, typer.Option(help="output directory (a run there with the same config resumes)")]
ConfigPath = Annotated[Optional[Path], typer.Option(help="JSON config (defaults: the tiny preset)")]
BatchSize = Annotated[int, typer.Option(min=1, help="items per step, over all processes")]
Overwrite = Annotated[bool, typer.Option(help="discard the run in --out-dir and start over")]
Overrides = Annotated[Optional[list[str]], typer.Option(
    "--set", help="LEVEL.KEY=VALUE: a generation config setting changed, checked as the file's are (repeatable; "
                  "VALUE in JSON or a plain string, e.g. 0.guidance_scale=1.5)")]
InitFrom = Annotated[Optional[Path], typer.Option(help="start from this artifact's weights (fine-tuning)")]

# The options of every training stage, with their defaults; they reach the stage as one TrainOptions.
TRAIN_OPTIONS: dict[str, tuple[object, object]] = {
    "device": (Device, "auto"),
    "batch_size": (BatchSize, 64),
    "checkpoint_step": (Annotated[int, typer.Option(min=1, help="evaluate, export and checkpoint every N steps")], 1000),
    "lr_step": (Annotated[int, typer.Option(min=0, help="halve the learning rate every N steps (0: cosine decay)")], 0),
    "max_epoch": (Annotated[int, typer.Option(min=1, help="passes over the training data")], 1),
    "max_steps": (Annotated[int, typer.Option(min=0, help="stop after N steps (0: no limit)")], 0),
    "seed": (Seed, 0),
    "resume": (Annotated[bool, typer.Option(help="continue the run in --out-dir with its saved config")], False),
    "overwrite": (Overwrite, False),
    "precision": (Annotated[str, typer.Option(
        help="auto: train in bfloat16 autocast where the device multiplies it natively (CUDA; CPUs with "
             "AVX512-BF16 or AMX), float32 elsewhere; float32: always")], "auto"),
}


def training_command(*, exclude: tuple[str, ...] = (), **defaults) -> Callable:
    """Give a stage's command the training options besides its own. The command takes them as one
    `options: TrainOptions` (with its own `out_dir`); `exclude` leaves some out (their TrainOptions
    default then holds), `defaults` changes a default."""
    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "options"]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                    default=defaults.get(name, default))
                  for name, (annotation, default) in TRAIN_OPTIONS.items() if name not in exclude]

        @functools.wraps(fn)
        def command(**kwargs):
            chosen = {name: kwargs.pop(name) for name in TRAIN_OPTIONS if name in kwargs}
            return fn(**kwargs, options=TrainOptions(out_dir=kwargs["out_dir"], **chosen))
        command.__signature__ = inspect.Signature(own + shared)
        return command
    return decorate


def entry(app: typer.Typer) -> None:
    app(prog_name=Path(sys.argv[0]).name)
