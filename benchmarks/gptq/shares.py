"""How a budget's sensitivity estimate shares a plan's error out among layer types: each
layer's relative error² (from an artifact's manifest) weighted by its sensitivity, summed by
type, for the gradients of the text's next tokens and of labels the model draws itself
(`calibration.loss.draw`), each in svdq's form Σ_t‖g_t‖² · Σ_t‖y_t‖² / T and per token,
Σ_t ‖g_t‖²‖y_t‖². Compare with what `damage.py` measures.

    python benchmarks/gptq/shares.py ARTIFACT [--model gemma3] [--sequences 2]
"""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def main() -> None:
    from damage import setup
    from svdq.calibration.loss import draw

    args, source, ids = setup(__doc__, 2)
    model = source.model
    for p in model.parameters():
        p.requires_grad_(False)
    layers = json.loads((args.artifact / "svdq.json").read_text())["layers"]
    error = {entry["name"]: entry["error"] for entry in layers}
    mods = {n: model.get_submodule(n) for n in error}
    for labels in ("text", "drawn"):
        sums = {n: [0.0, 0.0, 0.0] for n in mods}  # Σ‖g‖², Σ‖y‖², Σ‖g‖²‖y‖²
        norms: dict[str, torch.Tensor] = {}

        def hook(name):
            def forward(module, inputs, out):
                if out.requires_grad:
                    norms[name] = out.detach()[0].float().pow(2).sum(-1)
                    out.register_hook(lambda g: backward(name, g))
            return forward

        def backward(name, g):
            g2, y2 = g.detach()[0].float().pow(2).sum(-1), norms[name]
            s = sums[name]
            s[0] += float(g2.sum()); s[1] += float(y2.sum()); s[2] += float((g2 * y2).sum())

        handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
        generator, tokens = torch.Generator().manual_seed(0), 0
        try:
            for k in range(args.sequences):
                x = ids[k:k + 1]
                embedded = model.get_input_embeddings()(x).detach().requires_grad_(True)
                with torch.enable_grad():
                    logits = model(inputs_embeds=embedded, use_cache=False).logits[0, :-1].float()
                    target = x[0, 1:] if labels == "text" else draw(logits, generator)
                    nn.functional.cross_entropy(logits, target).backward()
                tokens += x.shape[1]
        finally:
            for h in handles:
                h.remove()
        for form in ("svdq", "per token"):
            raw = {n: (s[0] * s[1] / tokens if form == "svdq" else s[2]) / mods[n].weight.shape[0]
                   for n, s in sums.items()}
            weighted = collections.Counter()
            for n, r in raw.items():
                weighted[n.rpartition(".")[2]] += r * error[n] ** 2
            total = sum(weighted.values())
            print(f"{labels} labels, {form}: " + ", ".join(
                f"{k} {v / total:.0%}" for k, v in sorted(weighted.items())), flush=True)


if __name__ == "__main__":
    main()
