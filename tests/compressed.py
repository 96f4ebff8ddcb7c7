"""Tiny models compressed once per test session and saved: what the end-to-end tests of the
pipeline (tests/pipeline/test_pipeline.py) and of strict loading (tests/artifact/) share.

Tiny random models have flat spectra, so low-rank layers appear only at large eps (0.1-0.4
here); each case below was chosen to give a mix of low-rank and dense layers, and
test_round_trip_equal_outputs checks it. The `built` fixture (conftest.py) hands out a
`Builder`: `built(arch, eps, bits)` -> `Built`, each combination compressed at most once.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from svdq import artifact, runtime
from svdq.config import Settings
from svdq.models import load as hf
from svdq.pipeline.compress import compress

from conftest import make_text

CALIB = dict(calib_samples=4, calib_len=32, batch_size=4)

# (arch, eps, bits) -> a plan with at least one low-rank and at least one dense layer
G4, G8, G16 = ("gpt2", 0.1, 4), ("gpt2", 0.1, 8), ("gpt2", 0.1, 16)
L4, L8 = ("llama", 0.4, 4), ("llama", 0.35, 8)
B8 = ("bert", 0.15, 8)
KEPT = ("gpt2", 0.03, 4)  # NF4 error ~0.03: low-rank, dense 4-bit and kept-as-is layers at once
CASES = [G4, G8, G16, L4, L8, B8, KEPT]


def ids_for(tokenizer, n_words: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.tensor([tokenizer(make_text(n_words, seed), add_special_tokens=False)["input_ids"]])


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class Built:
    """One compressed model: the in-memory result, its outputs, and the saved artifact."""

    def __init__(self, arch, folder, out, eps, bits, calib_file):
        self.arch, self.folder, self.out = arch, folder, out
        self.source = hf.load_source(str(folder))
        self.settings = Settings(eps=eps, bits=bits, calib=str(calib_file), **CALIB)
        self.result = compress(self.source, self.settings)
        self.manifest = artifact.save(out, self.source, self.result, self.settings)
        self.ids = ids_for(self.source.tokenizer)
        self.expected = outputs(self.result.model, self.ids)

    def kinds(self) -> list[str]:
        return [p["kind"] if p["kind"] == "lowrank" or p["bits"] is None else f"dense{p['bits']}"
                for p in self.result.layers]


class Builder:
    """built(arch, eps, bits) -> Built, from the tiny models with random biases and norms."""

    def __init__(self, models: dict[str, Path], calib_file: Path, root: Path):
        self.models, self.calib_file, self.root = models, calib_file, root
        self.biased: dict[str, Path] | None = None
        self.cache: dict[tuple, Built] = {}

    def __call__(self, arch: str, eps: float, bits: int) -> Built:
        if self.biased is None:
            self.biased = biased(self.models, self.root / "biased")
        key = (arch, eps, bits)
        if key not in self.cache:
            self.cache[key] = Built(arch, self.biased[arch], self.root / f"{arch}-{eps}-{bits}",
                                    eps, bits, self.calib_file)
        return self.cache[key]


def biased(models: dict[str, Path], root: Path) -> dict[str, Path]:
    """The tiny models with random (not zero, as initialized) biases and norm parameters, so
    that losing or misplacing a bias shows in the outputs."""
    import transformers

    out = dict(models)
    for arch in ("gpt2", "bert"):
        model = transformers.AutoModel.from_pretrained(models[arch]) if arch == "bert" else \
            transformers.GPT2LMHeadModel.from_pretrained(models[arch])
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "ln" in name or "LayerNorm" in name:
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))
        shutil.copytree(models[arch], root / arch)
        model.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def damaged_copy(b: Built, tmp_path: Path) -> Path:
    dest = tmp_path / "damaged"
    shutil.copytree(b.out, dest)
    return dest


def rewrite_manifest(folder: Path, **changes) -> dict:
    """Edit the manifest and re-seal its own checksum, so the checks behind it are what a test
    meets (an edit without re-sealing is refused by the checksum: tests/cli/test_reliability.py)."""
    manifest = json.loads((folder / runtime.MANIFEST).read_text())
    manifest.update(changes)
    if "manifest_sha256" in manifest:
        manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (folder / runtime.MANIFEST).write_text(json.dumps(manifest))
    return manifest
