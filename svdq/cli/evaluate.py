"""`svdq eval`: perplexity, similarity or image accuracy of an artifact or a model."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from svdq.cli import app, err, mb, out, user_errors
from svdq.errors import SvdqError


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., metavar="MODEL", help="Artifact folder, or a hub id, model folder or .gguf file."),
    ppl: Optional[str] = typer.Option(None, "--ppl", help="Perplexity on `wikitext` (WikiText-2 "
                                      "test, needs `datasets`) or a UTF-8 text file."),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="File of sentences, one "
                                             "per line: cosine similarity of the artifact's and "
                                             "its source's mean-pooled last hidden states."),
    accuracy: Optional[Path] = typer.Option(None, "--accuracy", help="Folder of labelled "
                                            "images, one sub-folder per class (named by the "
                                            "model's labels or by index): top-1, top-5, and for "
                                            "an artifact agreement and KL to its source."),
    baseline: bool = typer.Option(False, help="Also measure the artifact's source model."),
    ctx: Optional[int] = typer.Option(None, help="Tokens per window (default: the model's "
                                      "context, at most 1024)."),
    stride: Optional[int] = typer.Option(None, help="Tokens between window starts, 1…ctx "
                                         "(default ctx; smaller overlaps windows)."),
    max_tokens: int = typer.Option(16384, help="Use the first N tokens of the text (0: all)."),
    batch_size: int = typer.Option(1, help="Windows (or sentences) per forward pass."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    write_card: bool = typer.Option(False, help="Record the perplexity in the artifact's model "
                                    "card (README.md) and svdq_eval.json."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Measure perplexity (sliding window) and/or encoder similarity of a model or artifact."""
    from svdq import evaluate as ev

    with user_errors():
        if ppl is None and similarity is None and accuracy is None:
            raise SvdqError("nothing to measure; give --ppl wikitext|FILE, --similarity FILE "
                            "or --accuracy DIR")
        if accuracy is not None:
            from svdq.calibration import images

            if not accuracy.is_dir() or not any(p.is_dir() for p in accuracy.iterdir()):
                raise SvdqError(f"--accuracy {accuracy} is no folder of class sub-folders; give "
                                "a folder with one sub-folder of images per class")
            images.check_folder(accuracy, "--accuracy folder")
        ev.check_options(ctx, stride, max_tokens, batch_size, device)  # before minutes of loading
        if write_card:
            _check_card(model, ppl)
        text = ev.read_text(ppl) if ppl is not None else None
        lines = ev.read_lines(similarity) if similarity is not None else None
        if lines == []:
            raise SvdqError(f"{similarity} has no non-empty lines; give one sentence per line")
        with err.status(f"loading {model}"):
            subject = ev.load_subject(model, device)
        if accuracy is not None:
            from svdq.evaluate.accuracy import check_classifier

            check_classifier(subject.model, model)
        needs_source = baseline or lines is not None or (accuracy is not None
                                                         and subject.manifest is not None)
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
                  "ppl": None, "similarity": None, "accuracy": None}
        if text is not None:
            subjects = [subject] + ([base] if baseline else [])
            report["ppl"] = _eval_ppl(subjects, text, ctx, stride, max_tokens, batch_size)
        if lines is not None:
            with err.status(f"similarity on {len(lines)} lines"):
                sim = ev.similarity(subject.model, base.model, subject.tokenizer, lines, batch_size)
            report["similarity"] = {**sim, "file": similarity, "source": base.label}
        if accuracy is not None:
            report["accuracy"] = _eval_accuracy(subject, base, baseline, accuracy, batch_size)
        if write_card:
            from svdq import __version__
            from svdq.artifact import card

            card.record_eval(Path(model), subject.manifest, report["ppl"], __version__)
    if as_json:
        print(json.dumps(report))
    else:
        _eval_summary(report, subject.manifest)


def _check_card(model: str, ppl: Optional[str]) -> None:
    """--write-card needs an artifact folder it may write and a perplexity to record."""
    from svdq.artifact import card
    from svdq.runtime import MANIFEST

    if ppl is None:
        raise SvdqError("--write-card records perplexity; add --ppl wikitext|FILE")
    folder = Path(model)
    if not (folder / MANIFEST).is_file():
        raise SvdqError(f"--write-card writes an artifact's model card, and {model} is not an "
                        "svdq artifact folder; drop --write-card")
    if not os.access(folder, os.W_OK) or ((folder / card.CARD).exists()
                                          and not os.access(folder / card.CARD, os.W_OK)):
        raise SvdqError(f"{folder} is not writable, so its card cannot be written; drop "
                        "--write-card or fix the folder's permissions")
    from svdq import artifact

    try:  # before minutes of evaluation: a manifest the card cannot describe
        card.render(artifact.read(folder, verify=False))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SvdqError(f"the manifest of {folder} lacks a field the model card shows "
                        f"({type(e).__name__}: {e}); drop --write-card") from None


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


def _eval_accuracy(subject, base, baseline: bool, folder: Path, batch_size: int) -> dict:
    """Accuracy of the subject (and against its source, where it is an artifact); the
    source's own row is kept with --baseline."""
    from svdq.evaluate.accuracy import accuracy

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=True)
    tasks: dict = {}

    def report(stage: str, done: int, total: int) -> None:
        task = tasks.setdefault(stage, bar.add_task(stage, total=total))
        bar.update(task, completed=done, total=total)

    with bar:
        result = accuracy([subject] + ([base] if base is not None else []), folder,
                          max(batch_size, 32), report)
    names = ["artifact" if subject.manifest else "model", "baseline"]
    for name, row in zip(names, result["rows"]):
        row["name"] = name
    if not baseline:
        result["rows"] = result["rows"][:1]
    return result


def _accuracy_summary(acc: dict) -> None:
    table = Table(title=f"accuracy on {acc['folder']}: {acc['images']:,} images, "
                  f"{acc['classes']} classes", title_justify="left")
    k = acc["rows"][0]["top5_k"]
    for col in ("", "top-1", f"top-{k}", "agreement", "KL to source", "images/s"):
        table.add_column(col, justify="left" if not col else "right", no_wrap=True)
    for r in acc["rows"]:
        kl = r.get("kl")
        table.add_row(r["name"], f"{r['top1']:.2%}", f"{r['top5']:.2%}",
                      f"{r['agreement']:.2%}" if "agreement" in r else "",
                      f"{kl:.5f}" if kl is not None else "", f"{r['images_per_s']:,.0f}")
    out.print(table)
    for r in acc["rows"]:
        out.print(f"  {r['name']}: {r['id']}", highlight=False)


def _eval_summary(report: dict, manifest: Optional[dict]) -> None:
    if report.get("accuracy") is not None:
        _accuracy_summary(report["accuracy"])
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
                          f"{r['tokens_per_s']:,.0f}", mb(sz[0]) if sz else "",
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
        out.print(f"{report['model']}: {mb(size['bytes'])} = {size['ratio_fp16']:.3f} × fp16",
                  highlight=False)
    if sim is not None:
        out.print(f"similarity to {sim['source']} on {sim['n']} lines of {sim['file']}: "
                  f"mean {sim['mean']:.6f}, min {sim['min']:.6f}, 5th percentile {sim['p5']:.6f}",
                  highlight=False)
