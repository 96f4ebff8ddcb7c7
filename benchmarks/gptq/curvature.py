"""Does a second-order estimate predict what an artifact's layers cost end to end? Per layer
type, the artifact's dequantized layers swapped into the source, the measured KL divergence of
its next-token distributions from the source's (a second-order quantity, unlike the text's
loss, whose first-order term is noise here), beside three estimates of it from the source's
gradients at each layer's outputs, for labels the model draws itself (the Fisher):

- isotropic, svdq's form: Σ_t‖g_t‖² / (T · out) · Σ_t‖e_t‖², e_t = (Ŵ − W) x_t;
- per output channel: Σ_i (Σ_t g_ti² / T) · Σ_t e_ti² (the Fisher's Kronecker factors, the
  output one kept to its diagonal);
- per token: Σ_t ‖g_t‖² ‖e_t‖² / out (each token's error weighted by its own gradient);
- directional: Σ_t (g_t · e_t)², averaged over the draws — for a draw from the model's own
  distribution, an unbiased estimate of 2 · KL to second order, layer by layer.

    python benchmarks/gptq/curvature.py ARTIFACT [--model gemma3] [--sequences 4] [--draws 4]
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def _kl(model, ids, reference=None) -> tuple[float, list[torch.Tensor]]:
    """Mean KL(reference ‖ model) per predicted token (0 and the log-probabilities kept
    without a reference)."""
    total, tokens, logps = 0.0, 0, []
    with torch.no_grad():
        for k in range(ids.shape[0]):
            logp = model(input_ids=ids[k:k + 1], use_cache=False).logits[0, :-1].float()
            logp = logp.log_softmax(-1)
            if reference is None:
                logps.append(logp)
            else:
                ref = reference[k]
                total += float((ref.exp() * (ref - logp)).sum())
            tokens += logp.shape[0]
    return total / tokens, logps


def main() -> None:
    from damage import setup
    from svdq import load
    from svdq.calibration.loss import draw

    args, source, ids = setup(__doc__, 4, {"--draws": 4})
    model = source.model
    for p in model.parameters():
        p.requires_grad_(False)
    stored = load(args.artifact, dequantize=True)
    new = {n: m.weight.data.float().clone() for n, m in stored.named_modules()
           if isinstance(m, nn.Linear) and ".layers." in f".{n}"}
    del stored
    mods = {n: model.get_submodule(n) for n in new}
    delta = {n: new[n] - mods[n].weight.data.float() for n in new}
    sums = {n: {"g2": 0.0, "gi2": 0.0, "e2": 0.0, "ei2": 0.0, "ge2": 0.0, "gt": 0.0} for n in new}
    inputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def forward(module, args_, out):
            if out.requires_grad:
                inputs[name] = args_[0].detach()[0].float()
                out.register_hook(lambda g: backward(name, g.detach()[0].float()))
        return forward

    def backward(name, g):
        x, s = inputs[name], sums[name]
        e = x @ delta[name].T  # T × out: the layer's output error
        s["g2"] += float(g.pow(2).sum()); s["e2"] += float(e.pow(2).sum())
        s.setdefault("gi", torch.zeros(g.shape[1], dtype=torch.float64))
        s["gi"] += g.pow(2).sum(0).double()
        s.setdefault("ei", torch.zeros(g.shape[1], dtype=torch.float64))
        s["ei"] += e.pow(2).sum(0).double()
        s["ge2"] += float((g * e).sum(-1).pow(2).sum())
        s["gt"] += float((g.pow(2).sum(-1) * e.pow(2).sum(-1)).sum())

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    generator, tokens = torch.Generator().manual_seed(0), 0
    try:
        for k in range(ids.shape[0]):
            x = ids[k:k + 1]
            embedded = model.get_input_embeddings()(x).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(inputs_embeds=embedded, use_cache=False).logits[0, :-1].float()
                for d in range(args.draws):  # the layers' input errors summed once per draw
                    loss = nn.functional.cross_entropy(logits, draw(logits, generator),
                                                       reduction="sum")
                    loss.backward(retain_graph=d + 1 < args.draws)
            tokens += x.shape[1] - 1
    finally:
        for h in handles:
            h.remove()
    draws = args.draws
    estimate = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for n, s in sums.items():
        out = mods[n].weight.shape[0]
        e2, ei = s["e2"] / draws, s["ei"] / draws  # the errors were summed per draw
        est = estimate[n.rpartition(".")[2]]
        est[0] += s["g2"] / draws / (tokens * out) * e2 / 2 / tokens
        est[1] += float((s["gi"] / draws / tokens * ei).sum()) / 2 / tokens
        est[2] += s["gt"] / draws / out / 2 / tokens
        est[3] += s["ge2"] / draws / 2 / tokens

    old = {n: mods[n].weight.data.clone() for n in new}
    _, reference = _kl(model, ids)

    def measured(swap) -> float:
        for n in new:
            mods[n].weight.data.copy_(new[n] if swap(n) else old[n])
        return _kl(model, ids, reference)[0]

    rows = [("all", measured(lambda n: True))]
    kinds = sorted(estimate)
    rows += [(kind, measured(lambda n, kind=kind: n.endswith("." + kind))) for kind in kinds]
    totals = [sum(estimate[k][j] for k in kinds) for j in range(4)]
    print(f"{ids.shape[0]} sequences, {tokens} predictions, {draws} draws each")
    print("type | KL measured | isotropic | per channel | per token | directional "
          "(estimates of KL, then their shares)")
    for kind, kl in rows:
        est = totals if kind == "all" else estimate[kind]
        share = "" if kind == "all" else " | " + " | ".join(
            f"{e / t:.0%}" for e, t in zip(est, totals))
        print(f"{kind} | {kl:.5f} | " + " | ".join(f"{e:.5f}" for e in est) + share, flush=True)


if __name__ == "__main__":
    main()
