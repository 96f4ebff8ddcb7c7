"""The `svdq` command: parse, call the library, show progress and tables. Nothing imports it.

One module per command (compress, inspect, evaluate, sweep, assets); this one holds the app,
the consoles and the helpers they share."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from svdq.errors import SvdqError

if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    # typer ≥ 0.29 writes a required argument as {name} in the usage line; write it as click
    # and man pages do (MODEL), optional ones in brackets as before
    _typer_usage = typer.core.TyperArgument._usage_display_name
    typer.core.TyperArgument._usage_display_name = (
        lambda self: self.display_name_raw if self.required and self.nargs == 1
        else _typer_usage(self))

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compress Hugging Face checkpoints with low-rank factors and quantization.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from svdq import __version__

        print(f"svdq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print svdq's version and exit.")) -> None:
    """Compress Hugging Face checkpoints with low-rank factors and quantization."""


def fail(message: str, code: int = 1) -> None:
    # escaped: a message may hold brackets (a path, `svdq[plot]`) that rich would take as markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors(interrupted: str = "interrupted") -> Iterator[None]:
    """Turn SvdqError and Ctrl-C inside the body into one `error:` line and a non-zero exit."""
    try:
        yield
    except SvdqError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(interrupted, 130)
    except PermissionError as e:  # an input or output the user may not read or write
        fail(f"permission denied: {e.filename or e}; check the path's permissions")


LOG_EVERY = 60.0  # seconds between progress lines when stderr is a file or a pipe


def progress_bar() -> tuple[Progress, Callable[[str, int, int], None]]:
    """A transient progress display on stderr and the (stage, done, total) callback feeding it.

    Where stderr is not a terminal (a log file, a pipe, a scheduler) rich draws nothing, so a
    long run would be silent for an hour: there the callback writes a plain line instead, at
    most one every LOG_EVERY seconds and none in the first LOG_EVERY (a quick command, or one
    that fails at once, keeps its output to its result or its one error line)."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}
    start = time.monotonic()
    next_line = start + LOG_EVERY

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal next_line
        key, _, detail = stage.partition(": ")  # "blocks: block 3: q_proj": one bar, its stage
        if key not in tasks:
            tasks[key] = bar.add_task(key, total=total)
        description = f"{key} · {detail}" if detail else key
        bar.update(tasks[key], completed=done, total=total, description=description)
        now = time.monotonic()
        if not err.is_terminal and now >= next_line:
            next_line = now + LOG_EVERY
            minutes, seconds = divmod(int(now - start), 60)
            err.print(f"svdq {minutes}:{seconds:02d} {description} {done}/{total}",
                      markup=False, highlight=False)
    return bar, progress


def mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from svdq.models.stream import tame_malloc

    tame_malloc()
    try:
        app()
    except KeyboardInterrupt:
        err.print("[bold red]error:[/] interrupted")
        sys.exit(130)


# the commands register themselves on `app`
from svdq.cli import (assets, compress, evaluate, export, finetune, inspect,  # noqa: E402,F401
                      spectrum, sweep)
from svdq.cli.evaluate import eval_  # noqa: E402,F401 - its defaults are tested
