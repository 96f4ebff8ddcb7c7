"""`svdq finetune`: an artifact fine-tuned by distillation from its source, same bytes."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from svdq.cli import app, err, out, progress_bar, user_errors


@app.command()
def finetune(
    path: str = typer.Argument(..., metavar="ARTIFACT", help="Artifact folder or hub repo id."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the fine-tuned artifact."),
    calib: str = typer.Option("auto", help="Training text: wikitext, self (sampled from the "
                              "source) or a text file; its last tokens (at least a tenth) are "
                              "held out for validation. auto: wikitext, else self. An image "
                              "model: a folder of images (a tenth held out)."),
    steps: int = typer.Option(200, help="Optimizer steps at most."),
    lr: float = typer.Option(1e-4, help="Peak learning rate (AdamW; warm-up, then linear decay)."),
    batch_size: int = typer.Option(4, help="Sequences per step."),
    seq_len: int = typer.Option(None, help="Tokens per sequence (default 256; an encoder "
                                "128, since it is tuned for texts as long as these: 32 for "
                                "sentences)."),
    samples: int = typer.Option(512, help="Training sequences at most."),
    val_samples: int = typer.Option(8, help="Held-out sequences for the validation loss."),
    eval_every: int = typer.Option(25, help="Steps between validation losses."),
    patience: int = typer.Option(3, help="Stop after this many validations without improvement."),
    checkpointing: bool = typer.Option(False, help="Recompute each block's activations in the "
                                       "backward pass (less memory, about a third slower)."),
    train_factors: bool = typer.Option(False, help="Train the low-rank factors themselves "
                                       "(straight-through their grid, re-quantized at the end) "
                                       "instead of their scales."),
    train_codes: bool = typer.Option(False, help="Train the codes too: every quantized weight "
                                     "and factor trains its values through its own grid "
                                     "(straight-through the rounding) with its scales, and is "
                                     "stored on the codes it ends on; same bytes."),
    codes_lr: float = typer.Option(None, help="Peak learning rate of the values --train-codes "
                                   "trains, in steps of their grid (default 0.02)."),
    train_embedding: bool = typer.Option(False, help="Train the token embedding and the output "
                                         "head too where they are stored in float (a tied head "
                                         "is the embedding); same bytes."),
    bf16: bool = typer.Option(False, help="Run the training steps' matrix products in bfloat16 "
                              "(autocast; the held-out losses stay float32): 20% faster a "
                              "step on SmolLM2 on a CPU with bfloat16 units."),
    ce_weight: float = typer.Option(0.0, help="A causal LM's loss adds this × the "
                                    "cross-entropy on the text's own next tokens to the KL from "
                                    "the source (0: distillation alone)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    seed: int = typer.Option(0, help="Seed of the sequence order and text sampling."),
    overwrite: bool = typer.Option(False, help="Replace an existing svdq artifact in the "
                                   "output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the recovery record as JSON."),
) -> None:
    """Fine-tune ARTIFACT by distillation from its source model: the scales of its quantized
    weights and factors, Σ, biases and norms train, codes stay; the stored bytes do not change."""
    from svdq.recovery.finetune import Options, finetune as run

    with user_errors(f"interrupted; nothing was written to {output} and {path} is unchanged"):
        opt = Options(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len,
                      samples=samples, val_samples=val_samples, eval_every=eval_every,
                      patience=patience, calib=calib, seed=seed, checkpointing=checkpointing,
                      train_factors=train_factors, train_codes=train_codes,
                      codes_lr=codes_lr, train_embedding=train_embedding, bf16=bf16,
                      ce_weight=ce_weight)
        bar, progress = progress_bar()
        with bar:
            record = run(path, output, opt, overwrite, device, progress,
                         warn=lambda m: err.print(f"[yellow]warning:[/] {m}"))
    if as_json:
        print(json.dumps(record))
        return
    before, after = record["val_loss_before"], record["val_loss_after"]
    out.print(f"wrote {output}: held-out {record['loss']} {before:.4g} -> {after:.4g} "
              f"({(after - before) / before:+.1%}) after {record['steps_run']} steps "
              f"(best at {record['best_step']}{', stopped early' if record['early_stopped'] else ''}), "
              f"{record['train_seconds']:.0f} s; bytes unchanged")
