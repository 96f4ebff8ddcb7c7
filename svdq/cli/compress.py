"""`svdq compress`: a model in, an artifact out."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from svdq.artifact import outdir
from svdq.cli import app, err, progress_bar, user_errors
from svdq.cli.summary import summary
from svdq.errors import SvdqError


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
    bits: int = typer.Option(8, help="Bits of stored weights and factors: 4 (NF4), 8 or 16 "
                             "(float16); with --grid int 2, 3, 4 or 8."),
    block_size: int = typer.Option(64, help="Elements per quantization block (per group of "
                                   "input columns on the integer grid)."),
    grid: str = typer.Option("auto", help="Grid of quantized weights: bnb (NF4, blockwise "
                             "8-bit) or int (uniform asymmetric integers, a float16 scale and "
                             "an integer zero point per group). auto: int for 2 and 3 bits."),
    gptq: bool = typer.Option(True, help="Quantize weights (dense ones and the bases that "
                              "corrections correct) by GPTQ against the calibration inputs; "
                              "--no-gptq rounds each to the nearest grid point."),
    method: str = typer.Option("auto", help="Factorization: svd, asvd (activation-scaled), "
                               "whiten (SVD-LLM, truncation-aware) or fisher (rows weighted "
                               "by loss gradients). auto: whiten with --residual or a budget, "
                               "else svd."),
    calib: str = typer.Option("auto", help="wikitext, self (text sampled from the model), a "
                              "text file, or for an image model a folder of PNG/JPEG images. "
                              "auto: wikitext, else self for causal LMs."),
    calib_samples: int = typer.Option(32, help="Calibration sequences (images for an image model)."),
    calib_len: int = typer.Option(512, help="Tokens per calibration sequence."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    include: list[str] = typer.Option([], help="Only compress layers matching this glob (repeatable)."),
    exclude: list[str] = typer.Option([], help="Never compress layers matching this glob (repeatable)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto (the checkpoint's), float32, float16 or bfloat16."),
    seed: int = typer.Option(0, help="Seed for sampling calibration text; runs are reproducible."),
    sequential: bool = typer.Option(False, help="Calibrate each block on the outputs of the "
                                    "blocks already compressed (one more forward per block); "
                                    "with --ratio/--size each candidate plan on its own."),
    refit: bool = typer.Option(False, help="Refit each low-rank U in closed form (least squares) "
                               "against the source layer's outputs; with --sequential, on the "
                               "source model's own inputs (one more forward per block)."),
    residual: bool = typer.Option(False, help="Quantize every weight at --bits and let low rank "
                                  "correct its quantization error (factors 8-bit) instead of "
                                  "replacing it. With --ratio/--size the allocator always "
                                  "considers this form."),
    overwrite: bool = typer.Option(False, help="Replace an existing svdq artifact in the "
                                   "output folder (a folder of other files is refused)."),
    stream: bool = typer.Option(True, help="Read the model block by block (memory: about one "
                                "block); --no-stream loads it whole."),
    sparse: float = typer.Option(0.0, help="Share of each linear layer's entries kept exactly "
                                 "(float16, CSR) beside its form, chosen by activation-aware "
                                 "saliency, e.g. 0.005; eps mode only."),
    attention_product: bool = typer.Option(False, help="Store each attention block's queries "
                                           "and keys as their product per head (W_Q,h W_K,hᵀ "
                                           "at a lower rank; eps bounds the error of the "
                                           "scores) where that stores fewer bytes. Models "
                                           "without rotary embeddings, eps mode."),
    embed_bits: int = typer.Option(0, help="Store the token embedding (and a head tied to "
                                   "it, which stays tied) at 4 or 8 bits: integer grid, groups "
                                   "of --block-size along each row, looked up de-quantized. "
                                   "0: leave it as it is."),
    budget_scope: str = typer.Option("targets", help="What --ratio/--size count: targets (the "
                                     "target layers) or all (the whole checkpoint as stored: "
                                     "the layers get what the other tensors leave)."),
    fast: bool = typer.Option(False, help="With --ratio/--size: a quicker plan search — "
                              "gradients on a sixteenth and the judge on an eighth of the "
                              "calibration sequences, the two bases nearest the budget's "
                              "bits, no low rank alone, at most three candidate plans, no "
                              "round of refinement."),
    offload_activations: bool = typer.Option(False, help="Keep the calibration activations in "
                                             "files beside the output instead of memory (also "
                                             "done by itself when they are large)."),
    shard_size: str = typer.Option("2GB", help="Largest tensor file of the artifact; larger "
                                   "artifacts are split into model-0000N-of-0000M.safetensors."),
    schedule: str = typer.Option("single", help="single: compress once; progressive: lower "
                                 "the budget (or raise eps) in --stages steps from near-lossless "
                                 "to the target; layerwise: compress the blocks in --groups "
                                 "groups, front to back. Each stage is fine-tuned by "
                                 "--finetune-steps."),
    stages: int = typer.Option(4, help="Stages of --schedule progressive."),
    groups: int = typer.Option(3, help="Groups of blocks of --schedule layerwise."),
    finetune_steps: int = typer.Option(0, help="Fine-tune each stage's artifact this many "
                                       "steps by distillation from MODEL on the calibration "
                                       "text (as `svdq finetune`); 0: none."),
    finetune_lr: float = typer.Option(1e-4, help="Peak learning rate of that fine-tuning."),
    finetune_seq_len: int = typer.Option(None, help="Tokens per sequence of that fine-tuning "
                                         "(as `svdq finetune --seq-len`; default 256, an "
                                         "encoder 128)."),
    finetune_codes: bool = typer.Option(False, help="Train the codes too in that fine-tuning "
                                        "(as `svdq finetune --train-codes`)."),
    finetune_embedding: bool = typer.Option(False, help="Train the float embedding and head "
                                            "too (as `svdq finetune --train-embedding`)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of tables."),
) -> None:
    """Compress MODEL into an artifact folder."""
    from svdq import artifact
    from svdq.config import Settings, parse_size

    with user_errors(f"interrupted; nothing was written to {output}"):
        if eps is not None and (ratio is not None or size is not None):
            raise SvdqError("--eps bounds each layer's error, --ratio/--size the total bytes: "
                            "give one of them")
        settings = Settings(eps=0.05 if eps is None else eps, bits=bits, block_size=block_size,
                            grid=grid, gptq=gptq,
                            method=method, include=tuple(include), exclude=tuple(exclude),
                            calib=calib, calib_samples=calib_samples, calib_len=calib_len,
                            batch_size=batch_size, seed=seed, device=device, dtype=dtype,
                            sequential=sequential, refit=refit, budget_ratio=ratio,
                            residual=residual, offload_activations=offload_activations,
                            sparse=sparse, attention_product=attention_product,
                            embed_bits=embed_bits, budget_scope=budget_scope, fast=fast,
                            budget_bytes=None if size is None else parse_size(size))
        shard_bytes = parse_size(shard_size, "--shard-size")
        artifact.check_output(output, overwrite)
        _preflight(model, settings)
        for flag, on in (("codes", finetune_codes), ("embedding", finetune_embedding)):
            if on and not finetune_steps:
                raise SvdqError(f"--finetune-{flag} trains in the fine-tuning; give --finetune-steps")
        if finetune_embedding and embed_bits:
            raise SvdqError("--finetune-embedding trains a float embedding, which --embed-bits "
                            "quantizes; drop one of them")
        staged = schedule != "single" or finetune_steps != 0
        if staged:
            from svdq.recovery import finetune as ft, schedule as sched

            sched.check(settings, schedule, stages if schedule == "progressive" else groups)
            if finetune_steps < 0:
                raise SvdqError(f"--finetune-steps must be 0 or more, got {finetune_steps}")
            opt = ft.Options(steps=finetune_steps, lr=finetune_lr, calib=calib, seed=seed,
                             seq_len=finetune_seq_len, train_codes=finetune_codes,
                             train_embedding=finetune_embedding) \
                if finetune_steps else None
            if opt is not None:
                opt.check()
            with outdir.locked(output):
                bar, progress = progress_bar()
                with bar:
                    manifest = sched.run(model, output, settings, schedule,
                                         stages if schedule == "progressive" else groups, opt,
                                         overwrite, shard_bytes, progress, _warn, revision,
                                         stream)
            _print(manifest, output, as_json)
            return
        if settings.sequential and settings.refit:
            err.print("[yellow]warning:[/] --sequential --refit fits each layer to the source's "
                      "outputs from drifted inputs, which has hurt badly where the drift is large "
                      "(see README); compare with and without using svdq eval", highlight=False)
        with outdir.locked(output):  # a second run into `output` refuses now, not after its work
            _run_compress(model, output, settings, revision, overwrite, as_json, shard_bytes,
                          stream)


def _preflight(model: str, settings) -> None:
    """Every check that needs no model, before minutes of loading one: the device, the input's
    permissions, the calibration file (and its length, where the tokenizer loads in seconds)."""
    from svdq import runtime
    from svdq.calibration import text as calibrate
    from svdq.models import load as hf

    try:
        runtime.check_device(settings.device)
    except runtime.ArtifactError as e:
        raise SvdqError(str(e).replace("device ", "--device ", 1)) from None
    path = Path(model).expanduser()
    if path.exists() and not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise SvdqError(f"{model} cannot be read (permission denied); check its permissions")
    if settings.calib in ("auto", "wikitext", "self"):
        return
    if Path(settings.calib).expanduser().is_dir():
        from svdq.calibration import images

        images.check_folder(Path(settings.calib).expanduser())
        return
    text = calibrate.check_file(Path(settings.calib))
    tokenizer = hf.local_tokenizer(model)
    if tokenizer is not None:
        calibrate.check_length(tokenizer, text, settings.calib_samples, settings.calib_len,
                               settings.calib)


def _run_compress(model: str, output: Path, settings, revision, overwrite: bool, as_json: bool,
                  shard_bytes: int, stream: bool) -> None:
    from svdq import artifact
    from svdq.models import load as hf
    from svdq.pipeline.compress import compress as run

    warn = _warn
    bar, progress = progress_bar()
    with bar:  # a GGUF file is converted once (a bar over its tensors); else seconds
        progress(f"loading {model}", 0, 1)
        source = hf.load_source(model, revision=revision, dtype=settings.dtype, stream=stream,
                                report=progress)
    for note in source.notes:
        warn(note)
    if err.is_terminal:  # for a person watching; logs get the manifest
        from svdq.pipeline.memory import estimate

        parts = estimate(source, settings)
        err.print(f"estimated peak memory ≈ {sum(parts.values()) / 1e9:.2f} GB ("
                  + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in parts.items() if v) + ")",
                  highlight=False)
    bar, progress = progress_bar()
    # the artifact's folder is open from the start: stored tensors go to disk as they are made
    with artifact.writing(output, overwrite, shard_bytes,
                          artifact.float_storage(source)) as pending:
        with bar:
            result = run(source, settings, progress, warn, sink=pending.tensors,
                         scratch=pending.tmp / ".scratch")
        if result.budget and "warning" in result.budget:
            err.print(f"[bold red]warning:[/] {result.budget['warning']}", highlight=False)
        with err.status(f"writing {output}"):
            manifest = pending.finish(source, result, settings)
    _print(manifest, output, as_json)


def _warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", highlight=False)


def _print(manifest: dict, output: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"output": str(output), "totals": manifest["totals"],
                          "budget": manifest.get("budget"),
                          "calibration": manifest["calibration"], "layers": manifest["layers"],
                          **{k: manifest[k] for k in ("schedule", "recovery", "device", "timings_s")
                             if k in manifest}}))
    else:
        summary(manifest, output)
