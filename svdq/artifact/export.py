"""An artifact as formats other tools read, written with the artifact's own atomic writer.

`hf`: an ordinary transformers folder — every target layer de-quantized (a low-rank layer
multiplied out, a residual one folded) into one float weight of the layer's own shape, the
config without svdq's `quantization_config`, the tokenizer and generation files. Any tool
that reads a Hugging Face checkpoint reads it; it is as large as the model in that dtype.

`peft`: the same folder with only the quantized dense parts in its weights (a low-rank layer's
weight is zero there), and each low-rank term U Σ Vᵀ as a PEFT LoRA adapter in `adapter/`:
lora_A = Vᵀ (rank, in), lora_B = U Σ (out, rank), `lora_alpha` = rank so PEFT's scaling
(alpha / rank) is 1; ranks per layer in `rank_pattern`. `PeftModel.from_pretrained(base,
"OUT/adapter")` computes what `svdq.load` does, in the export's dtype.

Both folders carry `svdq_export.json` (what was exported, how, and the bytes), which also lets
`--overwrite` replace an earlier export. The model is loaded as stored (about the artifact's
bytes) and one layer is expanded at a time.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from svdq import __version__, runtime
from svdq.artifact import SHARD_BYTES, load, locate, move_into_place, outdir, read, writing
from svdq.artifact.writer import INDEX
from svdq.errors import SvdqError

TARGETS = ("hf", "peft")
ADAPTER = "adapter"  # the LoRA adapter's folder inside a peft export
MARK = outdir.EXPORT  # svdq_export.json
DTYPES = ("auto", "float16", "bfloat16", "float32")
_SVDQ_FILES = {runtime.MANIFEST, "svdq_loader.py", "config.json", "README.md", INDEX, "svdq_eval.json"}


def export_dtype(name: str, manifest: dict) -> torch.dtype:
    """`--dtype`: auto is the artifact's dtype where it is 16-bit, else bfloat16 (float32's
    range: float16 overflows in some models' activations)."""
    if name not in DTYPES:
        raise SvdqError(f"--dtype {name!r} is unknown; use one of {', '.join(DTYPES)}")
    if name == "auto":
        name = manifest["dtype"] if manifest["dtype"] in ("float16", "bfloat16") else "bfloat16"
    return getattr(torch, name)


def layer_terms(layer: runtime.StoredLinear) -> tuple[torch.Tensor | None, tuple | None]:
    """A stored layer's quantized dense part (out, in), its sparse term added, and its
    low-rank term (U Σ, Vᵀ), float32; either is None where the layer has none."""
    dense = layer.dense_weight()
    low = None
    if layer.rank:
        low = (layer.factor("u").T * layer.svdq.s.float(), layer.factor("v"))
    sparse = layer.sparse()
    if sparse is not None:  # exact entries: part of the dense base
        dense = sparse.to_dense() if dense is None else dense + sparse.to_dense()
    return dense, low


def export(path: Path, to: str, out: Path, dtype: str = "auto", overwrite: bool = False,
           shard_bytes: int = SHARD_BYTES,
           progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write artifact `path` to folder `out` in format `to` (hf, peft); returns the record
    written as `svdq_export.json`."""
    if to not in TARGETS:
        raise SvdqError(f"--to {to!r} is unknown; use hf or peft")
    path, out = locate(path), Path(out)
    manifest = read(path)
    outdir.apart(path, out, "the export")
    outdir.check(out, overwrite)
    dt = export_dtype(dtype, manifest)
    if to == "peft" and not any(p["kind"] in ("lowrank", "residual") and p.get("rank")
                                for p in manifest["layers"]):
        raise SvdqError(f"{path} has no low-rank terms for an adapter; --to hf gives the same "
                        "model")
    model = load(path, dtype=dt)  # layers as stored: about the artifact's bytes in memory
    plan = {p["name"]: p for p in manifest["layers"]}
    stored = {n: m for n, m in model.named_modules() if isinstance(m, runtime.StoredLinear)}
    aliases = manifest.get("aliases", {})
    with writing(out, overwrite, shard_bytes) as pending:
        for key, t in model.state_dict().items():
            parts = key.split(".")
            if any(".".join(parts[:i]) in stored for i in range(1, len(parts))) \
                    or key in aliases or key.startswith("svdq."):
                continue  # target layers below; tied copies and svdq's codebooks not at all
            pending.tensors.add({key: t.to(dt) if t.is_floating_point() else t})
        adapter, folded = {}, 0
        for i, (name, layer) in enumerate(stored.items()):
            if progress:
                progress(f"layers: {name}", i, len(stored))
            dense, low = layer_terms(layer)
            if low is not None and to == "peft":
                adapter[name] = tuple(_shaped(t.to(dt).contiguous(), layer.conv, i)
                                      for i, t in enumerate(low))
            elif low is not None:
                folded += 1
                dense = low[0] @ low[1] if dense is None else dense.addmm_(*low)
            if dense is None:
                dense = torch.zeros(layer.out_features, layer.in_features)
            if plan[name]["module"] == "Conv1D":  # GPT-2's layers store (in, out)
                dense = dense.T
            dense = _shaped(dense, layer.conv, 1)
            pending.tensors.add({f"{name}.weight": dense.to(dt).contiguous()})
            if layer.bias is not None:
                pending.tensors.add({f"{name}.bias": layer.bias.detach().to(dt)})
            del dense
        base_bytes = pending.tensors.total_bytes
        pending.tensors.close()
        tmp = pending.tmp
        config = json.loads((path / "config.json").read_text())
        config.pop("quantization_config", None)
        config["dtype"] = str(dt).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in sorted(path.iterdir()):  # tokenizer, generation config, chat template, ...
            if f.is_file() and f.name not in _SVDQ_FILES and not f.name.startswith(".") \
                    and not f.name.endswith(".safetensors"):
                shutil.copyfile(f, tmp / f.name)
        adapter_bytes = _write_adapter(tmp / ADAPTER, adapter, plan, out.resolve(),
                                       manifest) if adapter else 0
        record = {
            "exported_from": str(path.resolve()), "to": to, "dtype": config["dtype"],
            "svdq_version": __version__, "source": manifest["source"],
            "artifact_tensor_bytes": manifest["totals"]["artifact_tensor_bytes"],
            "base_tensor_bytes": base_bytes, "adapter_tensor_bytes": adapter_bytes,
            "layers_expanded": len(stored), "lowrank_terms_folded": folded,
            "lowrank_terms_in_adapter": len(adapter),
        }
        (tmp / MARK).write_text(json.dumps(record, indent=1))
        outdir.publish_modes(tmp)
        move_into_place(tmp, pending.out)
    if progress:
        progress("layers: done", len(stored), len(stored))
    return record


def _shaped(t: torch.Tensor, conv: dict | None, side: int) -> torch.Tensor:
    """A (rows, cols) tensor as a convolution holds it: a weight or LoRA A (`side` 1) with
    the layer's kernel, LoRA B (`side` 0) as a 1×1 kernel; unchanged for linear layers."""
    if conv is None:
        return t
    if side == 0:
        return t[:, :, None, None]
    return t.reshape(t.shape[0], conv["in_channels"], *conv["kernel"])


def _write_adapter(folder: Path, adapter: dict, plan: dict, base: Path, manifest: dict) -> int:
    """The PEFT LoRA adapter of the low-rank terms; returns its tensor bytes."""
    from safetensors.torch import save_file

    folder.mkdir()
    ranks = {name: b.shape[1] for name, (b, _) in adapter.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    arch = manifest["architecture"]
    task = ("CAUSAL_LM" if arch.endswith("ForCausalLM") else None
            if arch.endswith("ForImageClassification") else "FEATURE_EXTRACTION")
    config = {
        "peft_type": "LORA", "task_type": task,
        "base_model_name_or_path": str(base), "inference_mode": True,
        "target_modules": sorted(adapter), "r": common, "lora_alpha": common,
        # full names, each its own rank and alpha = rank: PEFT's scale alpha / r is 1
        "rank_pattern": {n: r for n, r in ranks.items() if r != common},
        "alpha_pattern": {n: r for n, r in ranks.items() if r != common},
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": any(plan[n]["module"] == "Conv1D" for n in adapter),
        "init_lora_weights": True, "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for name, (b, a) in adapter.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())
