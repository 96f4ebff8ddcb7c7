"""`svdq inspect`: an artifact's plan as a table or JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

import typer
from rich.errors import NotRenderableError
from rich.table import Table

from svdq.cli import app, err, fail, out, user_errors
from svdq.errors import SvdqError
from svdq.cli.summary import summary


@app.command()
def inspect(
    path: Path = typer.Argument(..., metavar="ARTIFACT", help="Artifact folder or hub repo id."),
    sort: str = typer.Option("name", help="Order rows by name, bytes, ratio, error or rank."),
    top: int = typer.Option(0, help="Show only the first N rows after sorting (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    plot: Optional[Path] = typer.Option(None, help="Also draw the plan (bytes, rank, bits and "
                                        "error per layer) into this .png, .pdf or .svg file "
                                        "(needs matplotlib: the plot extra)."),
) -> None:
    """Show per-layer ranks, bytes and errors of an artifact."""
    from svdq import artifact

    keys = {"name": None, "bytes": "bytes", "ratio": "ratio", "error": "error", "rank": "rank"}
    with user_errors():
        if sort not in keys:
            raise SvdqError(f"--sort {sort!r} is unknown; use one of {', '.join(keys)}")
        if plot is not None:
            _check_plot(plot)
        manifest = artifact.read(artifact.locate(path))
    try:
        if plot is not None:
            from svdq.artifact.plot import draw

            with user_errors():
                draw(manifest, plot, f"{path} ({manifest['source']['id']})")
            err.print(f"drew the plan of {len(manifest['layers'])} layers into {plot}",
                      highlight=False)
        _inspect_table(path, manifest, keys[sort], top, as_json)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, NotRenderableError) as e:
        fail(f"the manifest of {path} lacks or mangles a field inspect shows ({type(e).__name__}: "
              f"{e}); compress the model again")


def _check_plot(plot: Path) -> None:
    from svdq.artifact.plot import FORMATS

    if importlib.util.find_spec("matplotlib") is None:
        raise SvdqError("--plot draws with matplotlib, which is not installed: pip install "
                        "'svdq[plot]', or drop --plot")
    if plot.suffix.lower() not in FORMATS:
        raise SvdqError(f"--plot {plot}: give a file ending in {', '.join(FORMATS)}")
    if not plot.parent.is_dir():
        raise SvdqError(f"--plot {plot}: the folder {plot.parent} does not exist; create it first")


def _form(p: dict) -> str:
    """A plan entry's stored form, for the table's kind column."""
    if p.get("rows"):
        return "q·k product"
    if p.get("lookup") is not None:
        return "embedding" + (" (tied head)" if p["lookup"] else "")
    return {"lowrank": "low-rank", "residual": "dense+low-rank"}.get(p["kind"], "dense")


def _inspect_table(path: Path, manifest: dict, key: Optional[str], top: int, as_json: bool) -> None:
    rows = [dict(p, ratio=p["bytes"] / p["fp16_bytes"]) for p in manifest["layers"]]
    if key:
        rows.sort(key=lambda p: p[key], reverse=True)
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
        # names fold onto more lines in a narrow terminal; numbers never wrap
        table.add_column(col, justify=just, overflow="fold" if col == "layer" else "ellipsis",
                         no_wrap=col != "layer", min_width=12 if col == "layer" else None)
    for p in rows:
        table.add_row(str(p["name"]), f"{p['out_features']}×{p['in_features']}",
                      _form(p) + (f"+{p['sparse_nnz']} exact" if p.get("sparse_nnz") else ""),
                      _rank(p), str(p["k_break"]),
                      (f"int{p['bits']}" if p.get("grid") == "int"
                       else str(p["bits"] or manifest["dtype"])), f"{p['bytes']:,}",
                      f"{p['ratio']:.3f}", f"{p['error']:.4f}")
    out.print(table)
    summary(manifest, path)


def _rank(p: dict) -> str:
    """A low-rank layer's rank; an attention-product layer's rows per head (h1+h2+…)."""
    if p.get("rows"):
        heads = p.get("attention_product", {}).get("heads", [])
        return "+".join(map(str, heads)) if len(heads) <= 4 else f"Σ{sum(heads)}"
    return str(p["rank"]) if p["kind"] != "dense" else "-"
