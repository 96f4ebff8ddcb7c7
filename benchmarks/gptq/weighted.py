"""Would GPTQ itself do better on a token-weighted Hessian? One layer type of the source
quantized by svdq's GPTQ (int4, groups of 64) on H = Σ_t x_t x_tᵀ and on H_g = Σ_t ‖g_t‖² x_t
x_tᵀ (each calibration token weighed by its own squared loss gradient at the layer's output,
labels drawn from the model itself: the token probe's weighting, `pipeline.probe`, put into
GPTQ's objective), on their blend (each scaled to unit trace), and on two weightings that need
no backward pass: H_n = Σ_t x_t x_tᵀ / mean(y_t²) (what a norm right after the layer divides
each token's output by: Gemma 3's post-norms) and H_p = Σ_t (1 − Σ_y p_t(y)²) x_t x_tᵀ (the
trace of the next-token distribution's own Fisher at t); the rest of the model as it is; the KL
divergence of the next-token distributions from the source's on held-out text for each.

    python benchmarks/gptq/weighted.py [--model gemma3] [--kind down_proj] [--sequences 8]
        [--held-out 8] [--only H,H_g,blend,H_n,H_p]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="gemma3")
    parser.add_argument("--kind", default="down_proj")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated, of: H, H_g, blend, H_n, "
                        "H_p (default: all)")
    args = parser.parse_args()

    from compare import plain_folder
    from svdq import assets
    from svdq.algo.dense import quantize_weight
    from svdq.algo.factorize import LayerStats
    from svdq.calibration import text
    from svdq.calibration.loss import draw
    from sweep import split_text

    calib, held, _ = split_text(assets.cache_dir() / "bench-text")
    _, _, source = plain_folder(args.model)
    model = source.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids_of = lambda path, n: text.calibration_ids(  # noqa: E731
        None, source.tokenizer, str(path), n, 512, 8, 0, True, lambda *a: None, None)[0][:n]
    ids, test = ids_of(calib, args.sequences), ids_of(held, args.held_out)
    mods = {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.endswith("." + args.kind)}
    grams = {n: [0, 0, 0, 0] for n in mods}  # H, H_g, H_n, H_p (float64)
    inputs: dict[str, torch.Tensor] = {}
    scale: dict[str, torch.Tensor] = {}
    spread: list[torch.Tensor] = []  # this sequence's 1 − Σ_y p(y)² per position

    def hook(name):
        def forward(module, a, out):
            inputs[name] = a[0].detach()[0].double()
            # each token's mean square output: what a norm right after the layer divides by
            scale[name] = out.detach()[0].double().pow(2).mean(-1, keepdim=True)
            out.register_hook(lambda g: backward(name, g.detach()[0].double()))
        return forward

    def backward(name, g):
        x = inputs.pop(name)
        grams[name][0] = grams[name][0] + x.T @ x
        grams[name][1] = grams[name][1] + (x * g.pow(2).sum(-1, keepdim=True)).T @ x
        grams[name][2] = grams[name][2] + (x / scale.pop(name)).T @ x
        w = torch.cat([spread[0], spread[0].new_zeros(len(x) - len(spread[0]))])  # last: no label
        grams[name][3] = grams[name][3] + (x * w[:, None]).T @ x

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    generator = torch.Generator().manual_seed(0)
    try:
        for k in range(len(ids)):
            embedded = model.get_input_embeddings()(ids[k:k + 1]).requires_grad_(True)
            with torch.enable_grad():
                logits = model(inputs_embeds=embedded, use_cache=False).logits[0, :-1].float()
                spread[:] = [1 - logits.detach().softmax(-1).pow(2).sum(-1).double()]
                nn.functional.cross_entropy(logits, draw(logits, generator)).backward()
    finally:
        for h in handles:
            h.remove()

    def logps():
        with torch.no_grad():
            return [model(input_ids=test[k:k + 1], use_cache=False).logits[0, :-1].float()
                    .log_softmax(-1) for k in range(len(test))]
    reference = logps()
    source_w = {n: m.weight.data.clone() for n, m in mods.items()}
    tokens = ids.shape[1] * len(ids)
    unit = lambda h: h / h.diagonal().sum()  # noqa: E731
    hessians = {"H": ("H = Σ x xᵀ", lambda n: grams[n][0]),
                "H_g": ("H_g = Σ ‖g‖² x xᵀ", lambda n: grams[n][1]),
                "blend": ("H/tr H + H_g/tr H_g", lambda n: unit(grams[n][0]) + unit(grams[n][1])),
                "H_n": ("H_n = Σ x xᵀ / mean(y²)", lambda n: grams[n][2]),
                "H_p": ("H_p = Σ (1 − Σ p²) x xᵀ", lambda n: grams[n][3])}
    for key in args.only.split(",") if args.only else hessians:
        label, hessian = hessians[key]
        for n, m in mods.items():
            h = hessian(n)
            stats = LayerStats(h, torch.zeros(h.shape[0], dtype=torch.float64), tokens)
            q = quantize_weight(source_w[n].float(), stats, 4, 64, "int", gptq=True)
            m.weight.data.copy_(q.dequantize())
        kl = sum(float((r.exp() * (r - p)).sum()) for r, p in zip(reference, logps()))
        print(f"{args.kind} by GPTQ int4 g64 on {label}: KL {kl / sum(len(r) for r in reference):.5f}",
              flush=True)
    for n, m in mods.items():
        m.weight.data.copy_(source_w[n])


if __name__ == "__main__":
    main()
