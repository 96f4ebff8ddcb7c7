"""`svdq spectrum`: how low-rank a model's layers are, as each factorization sees them.

Per target layer, the singular values of
- `weight`: W itself (what plain SVD truncates);
- `whitened`: W S with G = S Sᵀ the Gram of the layer's calibration inputs (SVD-LLM's
  truncation-aware view: truncating W S at rank k leaves exactly the output error
  √(Σ_{i>k} σᵢ²) on those inputs);
- `asvd`: W diag(mean |x_j|^½) (ASVD's activation scaling);
- `quant_error_4bit`: W − Q(W), Q NF4 in blocks of 64 (what a low-rank correction of 4-bit
  quantization has to capture);
and, for models without rotary embeddings, of each head's attention product B_h (plain and
whitened by its input's Gram) beside the head's own W_Q,h and W_K,h (`analysis.attention`).

Explained variance at rank k is Σ_{i≤k} σᵢ² / Σ σᵢ²; the table gives, per layer type and
spectrum, the median over layers of the smallest rank reaching 90/95/99%. The model is walked
one block at a time on the calibration text, as compress walks it.
"""
from __future__ import annotations

from typing import Callable

import torch

from svdq.algo.factorize import activation_aware_svd, whitened_svd
from svdq.algo.quant import quantize
from svdq.analysis import attention
from svdq.config import Settings
from svdq.models.load import Source
from svdq.pipeline.inputs import calibration_ids
from svdq.pipeline.walk import Walker
from svdq.pipeline.work import Clock

KINDS = ("weight", "whitened", "asvd", "quant_error_4bit")
HEAD_KINDS = ("B", "B_whitened", "W_Q_head", "W_K_head")
LEVELS = (0.90, 0.95, 0.99)


def explained(s: torch.Tensor) -> torch.Tensor:
    """Σ_{i≤k} σᵢ² / Σ σᵢ² for k = 1 … len(s)."""
    e = s.double() ** 2
    total = float(e.sum())
    return e.cumsum(0) / total if total > 0 else torch.ones_like(e)


def rank_for(s: torch.Tensor, level: float) -> int:
    """The smallest rank whose explained variance reaches `level`."""
    return int((explained(s) < level - 1e-12).sum()) + 1 if s.numel() else 0


def layer_spectra(w: torch.Tensor, stats) -> dict[str, torch.Tensor]:
    w = w.float()
    return {"weight": torch.linalg.svdvals(w),
            "whitened": whitened_svd(w, stats).s,
            "asvd": activation_aware_svd(w, stats).s,
            "quant_error_4bit": torch.linalg.svdvals(w - quantize(w, 4, 64).dequantize())}


def spectrum(source: Source, settings: Settings, progress: Callable[[str, int, int], None],
             warn: Callable[[str], None] | None = None) -> dict:
    """Every target layer's spectra and the attention products, with the summary table."""
    calibration: dict = {}
    ids = calibration_ids(source, settings, progress, calibration, warn)
    walker = Walker(source, settings, progress, Clock())
    n_heads = attention.heads(walker.model)
    layers, blocks = [], []
    reason = attention.why_not(walker.model, walker.blocks[0]) if len(walker.blocks) else "no blocks"
    try:
        walker.start(ids)
        for i in range(len(walker.blocks)):
            works = walker.enter(i)
            prefix = f"{walker.prefix}.{i}."
            for work in works:
                sv = layer_spectra(work.w, work.stats)
                layers.append({"name": work.name, "type": work.name.removeprefix(prefix),
                               "block": i, "shape": list(work.w.shape),
                               "sv": {k: v.tolist() for k, v in sv.items()}})
                work.weight = work.given = None
            if reason is None:
                q_name, wq, wk = attention.qk_weights(walker.blocks[i], n_heads)
                q_work = next((w for w in works if w.name == prefix + q_name), None)
                root = q_work.stats.root()[0] if q_work is not None else None
                blocks.append({"block": i, "heads": [
                    {"B": b.tolist(), "W_Q_head": q.tolist(), "W_K_head": k.tolist(),
                     **({"B_whitened": bw.tolist()} if bw is not None else {})}
                    for b, q, k, bw in zip(
                        attention.product_spectra(wq, wk, n_heads),
                        attention.head_spectra(wq, n_heads), attention.head_spectra(wk, n_heads),
                        attention.product_spectra(wq, wk, n_heads, root) if root is not None
                        else [None] * n_heads)]})
            walker.leave(i)
    finally:
        walker.close()
    result = {"model": source.id, "calibration": calibration, "kinds": list(KINDS),
              "layers": layers, "attention": {"applies": reason is None, "why_not": reason,
                                              "heads": n_heads, "blocks": blocks}}
    result["table"] = table(result)
    return result


def _median(xs: list[int]) -> int:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def table(result: dict) -> list[dict]:
    """Per layer type (and the attention product) and spectrum: full rank and the median
    rank reaching each of LEVELS."""
    groups: dict[tuple[str, str], list[torch.Tensor]] = {}
    for layer in result["layers"]:
        for kind in KINDS:
            groups.setdefault((layer["type"], kind), []).append(torch.tensor(layer["sv"][kind]))
    for block in result["attention"]["blocks"]:
        for head in block["heads"]:
            for kind in HEAD_KINDS:
                if kind in head:
                    groups.setdefault(("attention head", kind), []).append(torch.tensor(head[kind]))
    rows = []
    for (kind_of_layer, kind), spectra in groups.items():
        rows.append({"type": kind_of_layer, "spectrum": kind, "count": len(spectra),
                     "full_rank": max(s.numel() for s in spectra),
                     **{f"r{round(p * 100)}": _median([rank_for(s, p) for s in spectra])
                        for p in LEVELS}})
    return rows
