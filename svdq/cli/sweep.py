"""`svdq sweep`: many settings on one analysis, against quantization-only baselines."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.table import Table

from svdq.cli import app, err, out, progress_bar, user_errors
from svdq.errors import SvdqError


def _values(text: str, what: str, kind: Callable, example: str, noun: str = "numbers") -> list:
    """Comma-separated values of `kind`, each once, in the order given."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SvdqError(f"--{what} takes comma-separated {noun}, e.g. {example}; "
                        f"got {text!r}") from None
    return list(dict.fromkeys(values))


@app.command()
def sweep(
    model: str = typer.Argument(..., metavar="MODEL", help="Hub id, local Hugging Face folder, or .gguf file."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for results.json, "
                                "results.csv and frontier.png."),
    eps: str = typer.Option("0.02,0.05,0.1,0.2", help="Comma-separated eps values."),
    bits: str = typer.Option("4,8", help="Comma-separated bit widths (4, 8, 16; 2, 3 on the "
                             "integer grid)."),
    grid: str = typer.Option("auto", help="Grid of quantized weights, as for compress."),
    gptq: bool = typer.Option(True, help="Quantize weights by GPTQ (--no-gptq: rounding), as "
                              "for compress; bitsandbytes baselines always round, as it does."),
    ppl: Optional[str] = typer.Option(None, "--ppl", help="Perplexity on wikitext or a text file."),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="Sentences file: cosine "
                                             "similarity to the source (encoders)."),
    accuracy: Optional[Path] = typer.Option(None, "--accuracy", help="Folder of labelled "
                                            "images, one sub-folder per class: top-1 accuracy "
                                            "(image classifiers)."),
    block_size: int = typer.Option(64, help="Elements per quantization block."),
    method: str = typer.Option("auto", help="Comma-separated factorizations to compare: "
                               "svd, asvd, whiten, fisher; auto: as compress chooses (whiten "
                               "for --residual and --ratio, else svd)."),
    residual: bool = typer.Option(False, help="Also, per method, bits and eps: quantized weights "
                                  "with low-rank corrections (as compress --residual)."),
    ratio: str = typer.Option("", help="Comma-separated byte budgets (× fp16 of the target "
                              "layers), one global allocation per method each (as compress "
                              "--ratio), e.g. 0.28,0.35,0.5."),
    sparse: float = typer.Option(0.0, help="Share of a linear layer's entries it may also keep "
                                 "exactly, as for compress (budgets: sparse variants among the "
                                 "options), e.g. 0.005."),
    with_baselines: bool = typer.Option(True, "--baselines/--no-baselines",
                                        help="Also the quantization-only baselines (GPTQ, "
                                        "bitsandbytes, float16); --no-baselines: the source "
                                        "and the settings asked for alone."),
    calib: str = typer.Option("auto", help="wikitext, self, a text file, or a folder of images "
                              "(as for compress)."),
    calib_samples: int = typer.Option(32, help="Calibration sequences."),
    calib_len: int = typer.Option(512, help="Tokens per calibration sequence."),
    ctx: Optional[int] = typer.Option(None, help="Perplexity window (default: model context, ≤1024)."),
    stride: Optional[int] = typer.Option(None, help="Perplexity stride (default ctx)."),
    max_tokens: int = typer.Option(16384, help="Evaluate on the first N tokens of the text (0: all)."),
    batch_size: int = typer.Option(1, help="Windows (or sentences) per evaluation forward pass."),
    include: list[str] = typer.Option([], help="Only layers matching this glob (repeatable)."),
    exclude: list[str] = typer.Option([], help="Never layers matching this glob (repeatable)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    seed: int = typer.Option(0, help="Seed for calibration sampling."),
    overwrite: bool = typer.Option(False, help="Replace results already in the output folder."),
    plot: bool = typer.Option(True, "--plot/--no-plot",
                              help="Draw frontier.png (needs matplotlib: the plot extra)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Compress MODEL at every eps × bits, evaluate each against quantization-only baselines."""
    from svdq import evaluate as ev
    from svdq.models import load as hf
    from svdq import sweep as sw
    from svdq.config import Settings

    with user_errors():
        if plot and importlib.util.find_spec("matplotlib") is None:  # before the long work
            raise SvdqError("svdq sweep draws frontier.png with matplotlib, which is not "
                            "installed: pip install 'svdq[plot]', or pass --no-plot")
        if sum(x is not None for x in (ppl, similarity, accuracy)) != 1:
            raise SvdqError("give exactly one quality measure: --ppl wikitext|FILE, "
                            "--similarity FILE or --accuracy DIR")
        if accuracy is not None:
            from svdq.calibration import images

            images.check_folder(accuracy, "--accuracy folder")
        eps_list = _values(eps, "eps", float, "0.02,0.05,0.1")
        bits_list = _values(bits, "bits", int, "4,8", "whole numbers")
        ratios = _values(ratio, "ratio", float, "0.28,0.35")
        if not (eps_list or ratios) or not bits_list:
            raise SvdqError("--bits needs at least one value, and --eps or --ratio at least one")
        for r in ratios:
            Settings(budget_ratio=r)
        # one Settings carries what the shared analysis needs; eps and bits vary per setting
        methods = _values(method, "method", str.strip, "svd,whiten", "names")
        # --method auto resolves as compress would for these forms
        auto = Settings(residual=residual, budget_ratio=ratios[0] if ratios else None).method
        methods = list(dict.fromkeys(auto if m == "auto" else m for m in methods))
        for m in methods:
            Settings(method=m)
        settings = Settings(eps=eps_list[0] if eps_list else 0.05, bits=bits_list[0], block_size=block_size,
                            method=methods[0] if methods else "", include=tuple(include), exclude=tuple(exclude),
                            calib=calib, calib_samples=calib_samples, calib_len=calib_len,
                            seed=seed, device=device, grid=sw.grid_for(bits_list[0], grid),
                            gptq=gptq, sparse=sparse)
        if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not overwrite)):
            raise SvdqError(f"{output} exists and is not an empty folder; pass --overwrite or "
                            "choose another -o")
        for e in eps_list:  # every value is checked before minutes of work
            for b in bits_list:
                Settings(eps=e, bits=b, block_size=block_size, grid=sw.grid_for(b, grid))
        ev.check_options(ctx, stride, max_tokens, batch_size, device)
        text = ev.read_text(ppl) if ppl is not None else None
        lines = ev.read_lines(similarity) if similarity is not None else None
        if lines == []:
            raise SvdqError(f"{similarity} has no non-empty lines; give one sentence per line")
        with err.status(f"loading {model}"):
            source = hf.load_source(model, dtype="auto")
        for note in source.notes:
            err.print(f"[yellow]warning:[/] {note}", highlight=False)
        measure, metric = sw.evaluator(source, text, lines, ctx, stride, max_tokens, batch_size,
                                       accuracy)
        bar, progress = progress_bar()
        with bar:
            results = sw.run(source, settings, eps_list, bits_list, measure, metric, progress,
                             methods, residual, ratios, grid, with_baselines)
        results["evaluation"] = {"text": text[1] if text else similarity or str(accuracy),
                                 "max_tokens": max_tokens,
                                 "ctx": ctx, "stride": stride, "lines": len(lines or [])}
        files = sw.write(results, output, plot)
    if as_json:
        print(json.dumps(results))
        return
    _sweep_table(results)
    out.print("wrote " + ", ".join(str(f) for f in files), highlight=False)


def _sweep_table(results: dict) -> None:
    better = "lower" if results["metric"] == "perplexity" else "higher"
    table = Table(title=f"{results['source']}: {results['metric']} ({better} is better); "
                  f"analysis (calibration, statistics, SVDs) {results['analysis_s']} s, done once",
                  title_justify="left")
    for col in ("method", "bits", "eps / ratio", "MB", "× fp16", results["metric"], "low-rank",
                "corrected", "frontier"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in results["rows"]:
        knob = (f"{r['eps']:g}" if r["eps"] is not None
                else f"≤ {r['ratio']:g}" if r.get("ratio") is not None else "-")
        table.add_row(r["method"], str(r["bits"] or "-"), knob,
                      f"{r['target_bytes'] / 1e6:,.2f}", f"{r['target_ratio_fp16']:.3f}",
                      f"{r['quality']:.4f}", f"{r['lowrank_layers']}/{r['layers']}",
                      f"{r.get('residual_layers', 0)}/{r['layers']}", "★" if r["pareto"] else "")
    out.print(table)
