"""Probe: GPTQ on the asymmetric target (GPTAQ's idea) against plain GPTQ, sequentially, MiniLM.

    python benchmarks/gptq/asymmetric.py [--bits 3] [--group 64] [--damp 0.01]

Every Linear of all-MiniLM-L6-v2's encoder blocks is quantized by svdq's GPTQ, block after
block, each block's inputs X̃ taken from the model quantized so far (as `--sequential` does).
"plain" quantizes W against G = X̃ᵀX̃; "asymmetric" quantizes the least-squares target that
also undoes what the upstream blocks changed, W̃ᵀ = (G + d I)⁻¹ (C Wᵀ + d Wᵀ) with
C = X̃ᵀX₀ (X₀ the source model's inputs to the layer) and d = `--damp` × mean diag G, which
pulls W̃ towards W. Prints each variant's median layer error against the source's outputs,
‖X̃ Ŵᵀ − X₀ Wᵀ‖ / ‖X₀ Wᵀ‖, and the sentence-embedding similarity to the source on the bench
text's held-out sentences. Calibration: 64 × 128 tokens of the bench text's calib part.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parents[1]))
from sweep import split_text  # noqa: E402

from svdq import assets  # noqa: E402
from svdq.algo.gptq import gptq  # noqa: E402
from svdq.evaluate.similarity import similarity  # noqa: E402


def linears(model, i: int) -> dict[str, torch.nn.Linear]:
    return {k: m for k, m in model.encoder.layer[i].named_modules() if isinstance(m, torch.nn.Linear)}


def inputs(model, i: int, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each Linear of block i's inputs (tokens × in, float64) on one forward of `batch`."""
    seen, hooks = {}, []
    for k, lin in linears(model, i).items():
        hooks.append(lin.register_forward_hook(
            lambda mod, args, out, k=k: seen.__setitem__(k, args[0].reshape(-1, args[0].shape[-1]).double())))
    with torch.no_grad():
        model(input_ids=batch, attention_mask=torch.ones_like(batch))
    for h in hooks:
        h.remove()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--damp", type=float, default=0.01)
    args = parser.parse_args()
    calib, _, sentences = split_text(assets.cache_dir() / "bench-text")
    path = assets.fetch("minilm")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    source = transformers.AutoModel.from_pretrained(path).eval()
    ids = tok(calib.read_text(encoding="utf-8")[:400_000], return_tensors="pt").input_ids[0]
    batch = ids[: 64 * 128].view(64, 128)
    lines = [s for s in sentences.read_text(encoding="utf-8").splitlines() if s][:300]
    models = {"plain": copy.deepcopy(source), "asymmetric": copy.deepcopy(source)}
    errors = {name: [] for name in models}
    for i in range(len(source.encoder.layer)):
        x0 = inputs(source, i, batch)
        for name, model in models.items():
            xq = inputs(model, i, batch)
            for k, lin in linears(model, i).items():
                x, w = xq[k], lin.weight.data.double()
                g = x.T @ x
                target = w
                if name == "asymmetric":
                    d = args.damp * float(g.diagonal().mean())
                    eye = torch.eye(len(g), dtype=g.dtype)
                    target = torch.linalg.solve(g + d * eye, x.T @ x0[k] @ w.T + d * w.T).T
                q = gptq(target.float(), g, args.bits, args.group).dequantize().float()
                y0 = x0[k] @ w.T
                errors[name].append(float((x @ q.double().T - y0).norm() / y0.norm()))
                lin.weight.data.copy_(q)
    for name, model in models.items():
        sim = similarity(source, model, tok, lines)["mean"]
        print(f"{name}: int{args.bits} g{args.group}, median layer error against the source "
              f"{statistics.median(errors[name]):.4f}, similarity {sim:.4f}")


if __name__ == "__main__":
    main()
