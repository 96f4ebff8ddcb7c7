"""`svdq spectrum`: singular-value spectra of a model's layers and attention products."""
from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.table import Table

from svdq.cli import app, err, out, progress_bar, user_errors
from svdq.errors import SvdqError


@app.command()
def spectrum(
    model: str = typer.Argument(..., metavar="MODEL", help="Hub id, local Hugging Face folder, or .gguf file."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for spectrum.json and spectrum.png."),
    calib: str = typer.Option("auto", help="As for compress: wikitext, self or a text file."),
    calib_samples: int = typer.Option(16, help="Calibration sequences."),
    calib_len: int = typer.Option(512, help="Tokens per calibration sequence."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    include: list[str] = typer.Option([], help="Only layers matching this glob (repeatable)."),
    exclude: list[str] = typer.Option([], help="Never layers matching this glob (repeatable)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    plot: bool = typer.Option(True, help="Draw spectrum.png (needs matplotlib: svdq[plot])."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """Singular values of every target layer (plain, whitened, activation-scaled, and of its
    4-bit quantization error) and of each head's W_Q,h W_K,hᵀ; the rank each needs for 90/95/99%
    of the variance."""
    from svdq.cli.compress import _preflight, _warn
    from svdq.config import Settings

    with user_errors("interrupted"):
        if output.exists() and not output.is_dir():
            raise SvdqError(f"-o {output} is a file; give a folder")
        if plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise SvdqError("spectrum.png needs matplotlib: pip install 'svdq[plot]', or "
                                "pass --no-plot") from None
        settings = Settings(calib=calib, calib_samples=calib_samples, calib_len=calib_len,
                            batch_size=batch_size, include=tuple(include),
                            exclude=tuple(exclude), device=device, dtype=dtype, method="svd")
        _preflight(model, settings)
        from svdq.analysis import spectrum as sp
        from svdq.models import load as hf

        bar, progress = progress_bar()
        with bar:
            progress(f"loading {model}", 0, 1)
            source = hf.load_source(model, dtype=dtype, stream=True, report=progress)
            result = sp.spectrum(source, settings, progress, _warn)
        output.mkdir(parents=True, exist_ok=True)
        _atomic(output / "spectrum.json", json.dumps(result))
        if plot:
            from svdq.analysis.figure import draw

            draw(result, output / ".spectrum.png.tmp.png")
            os.replace(output / ".spectrum.png.tmp.png", output / "spectrum.png")
    if as_json:
        print(json.dumps({"table": result["table"], "attention": {
            k: v for k, v in result["attention"].items() if k != "blocks"}}))
        return
    t = Table(title=f"rank for 90/95/99% explained variance (median over layers): {model}",
              title_justify="left")
    for col in ("layer type", "spectrum", "layers", "full rank", "90%", "95%", "99%"):
        t.add_column(col, justify="left" if col in ("layer type", "spectrum") else "right")
    for r in result["table"]:
        t.add_row(r["type"], r["spectrum"], str(r["count"]), str(r["full_rank"]), str(r["r90"]),
                  str(r["r95"]), str(r["r99"]))
    out.print(t)
    if not result["attention"]["applies"]:
        err.print(f"attention product: not computed — {result['attention']['why_not']}",
                  highlight=False)
    out.print(f"wrote {output / 'spectrum.json'}" + (f" and {output / 'spectrum.png'}" if plot else ""))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
