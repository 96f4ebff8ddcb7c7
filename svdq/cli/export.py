"""`svdq export`: an artifact as an ordinary Hugging Face folder, or as one plus a PEFT adapter."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from svdq.cli import app, mb, out, progress_bar, user_errors


@app.command()
def export(
    path: str = typer.Argument(..., metavar="ARTIFACT", help="Artifact folder or hub repo id."),
    to: str = typer.Option(..., "--to", help="hf: every layer de-quantized into a plain "
                           "transformers folder; peft: the quantized parts as that folder and "
                           "the low-rank terms as a PEFT LoRA adapter in OUTPUT/adapter."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write."),
    dtype: str = typer.Option("auto", help="auto (the artifact's where 16-bit, else "
                              "bfloat16), float16, bfloat16 or float32."),
    overwrite: bool = typer.Option(False, help="Replace an earlier svdq export or artifact "
                                   "in the output folder."),
    shard_size: str = typer.Option("2GB", help="Largest tensor file; larger exports are split "
                                   "into model-0000N-of-0000M.safetensors."),
    as_json: bool = typer.Option(False, "--json", help="Print the export record as JSON."),
) -> None:
    """Write ARTIFACT in a format other tools load (transformers, vLLM, PEFT)."""
    from svdq.artifact.export import export as run_export
    from svdq.config import parse_size

    with user_errors(f"interrupted; nothing was written to {output}"):
        shard_bytes = parse_size(shard_size, "--shard-size")
        bar, progress = progress_bar()
        with bar:
            record = run_export(path, to, output, dtype, overwrite, shard_bytes, progress)
    if as_json:
        print(json.dumps(record))
        return
    out.print(f"wrote {output} ({record['to']}, {record['dtype']}): "
              f"{mb(record['base_tensor_bytes'])} of weights"
              + (f" + {mb(record['adapter_tensor_bytes'])} adapter "
                 f"({record['lowrank_terms_in_adapter']} low-rank terms)"
                 if record["adapter_tensor_bytes"] else "")
              + f", from {mb(record['artifact_tensor_bytes'])} stored")
