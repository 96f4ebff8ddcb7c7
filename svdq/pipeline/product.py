"""`--attention-product`: a block's query and key layers stored together as the attention
product (`algo.product`) — in eps mode where that stores fewer bytes than their own forms, in
a budget as a candidate plan judged beside the others (`fit_block`).

Per block, each (query, key) pair among the target layers — GPT-2's fused `c_attn` holds both,
and its values — gets its two eps-mode forms as usual and the product form with the fewest
rows whose score error is ≤ eps; the product is taken where its rows store fewer bytes than
the two forms together. The product layers are dense layers storing some output rows
(`Stored.rows`): per head the first r_h of its d outputs, the others zero, so the model's
attention code runs unchanged (the zero-padded dimensions add nothing to q · k).
"""
from __future__ import annotations

import torch
from torch import nn

from svdq.algo.error import error_norm2, reference
from svdq.algo.product import (HeadProducts, ProductForm, head_products, largest_product,
                               runs, smallest_product)
from svdq.algo.quant import quantize
from svdq.algo.stored import Stored
from svdq.models.attention import FUSED, PAIRS, why_not
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.pipeline.work import LayerWork
from svdq.runtime import runs_index


def check(model: nn.Module) -> None:
    """Refuse, before any calibration, a model the product does not apply to."""
    why = why_not(model)
    if why:
        raise SvdqError(f"--attention-product does not apply: {why}; drop --attention-product")


def plan_block(works: list[LayerWork], settings: Settings, n_heads: int,
               choose_form) -> dict[str, tuple[Stored, dict]]:
    """The forms of the block's query and key layers (fused: the c_attn layer) where the
    product pays, with what the manifest notes; `choose_form(work, settings)` makes a layer's
    own eps-mode form. Layers not returned are chosen as usual."""
    out: dict[str, tuple[Stored, dict]] = {}
    for qw, kw in pairs(works):
        out.update(_pair(qw, kw, settings, n_heads, choose_form))
    for work in works:
        if work.name.endswith("." + FUSED):
            out.update(_fused(work, settings, n_heads, choose_form))
    return out


def pairs(works: list[LayerWork]) -> list[tuple[LayerWork, LayerWork]]:
    """The block's (query, key) layers that are both targets, as `PAIRS` names them."""
    by_name = {w.name: w for w in works}
    found = []
    for qw in works:
        for q, k in PAIRS:
            kw = by_name.get(qw.name[: -len(q)] + k) if qw.name.endswith("." + q) else None
            if kw is not None:
                found.append((qw, kw))
    return found


def _pair(qw: LayerWork, kw: LayerWork, settings: Settings, n_heads: int, choose_form
          ) -> dict[str, tuple[Stored, dict]]:
    own = {qw.name: choose_form(qw, settings), kw.name: choose_form(kw, settings)}
    products = head_products(qw.w, qw.bias, kw.w, n_heads, qw.stats)
    form = smallest_product(products, settings.eps, settings.bits, settings.block_size,
                            settings.grid)
    if form is None:
        return {name: (stored, {}) for name, stored in own.items()}
    new = _stored_pair(qw, kw, form, products.d)
    if sum(s.nbytes() for s in new.values()) >= sum(_bytes(own[w.name], w) for w in (qw, kw)):
        return {name: (stored, {}) for name, stored in own.items()}
    return _noted(qw, kw, form, new)


def _stored_pair(qw: LayerWork, kw: LayerWork, form: ProductForm, d: int) -> dict[str, Stored]:
    """The query and key layers of `form` as stored: dense layers keeping the new rows."""
    out_f = qw.w.shape[0]
    rows = runs(form.ranks, d)
    q_bias = None
    if qw.bias is not None:
        q_bias = torch.zeros(out_f)
        q_bias[runs_index(rows)] = form.q_bias.cpu()
    common = dict(kind="dense", rank=0, k_break=out_f, bits=form.q.bits, error=form.error,
                  rows=rows, outputs=out_f)
    return {qw.name: Stored(weight=form.q, bias=q_bias, **common),
            kw.name: Stored(weight=form.k, bias=None if kw.bias is None else torch.zeros(out_f),
                            **common)}


def _noted(qw: LayerWork, kw: LayerWork, form: ProductForm, new: dict[str, Stored]
           ) -> dict[str, tuple[Stored, dict]]:
    notes = {"attention_product": {"heads": form.ranks, "score_error": form.error,
                                   "pair": [qw.name, kw.name]}}
    return {name: (stored, notes) for name, stored in new.items()}


# The grids a budget's product rows are tried at: (bits, grid). The integer grid's 2 and 3
# bits too, since a tight budget gives q and k only a few bits a weight (MiniLM at 0.2 × fp16
# rejected a product offered at 4 and 8 bits alone).
BUDGET_BITS = ((2, "int"), (3, "int"), (4, "int"), (4, "bnb"), (8, "bnb"))


def fit_block(works: list[LayerWork], n_heads: int, room: dict[str, int], settings: Settings
              ) -> dict[str, tuple[Stored, dict]]:
    """A budget's product candidate for one block: each (query, key) pair stored as the
    product with the lowest score error whose two layers' stored bytes fit in `room` (what
    the plan it is built on gives the two layers together, their biases apart), over the
    grids of BUDGET_BITS; pairs where nothing fits are not returned (they keep that plan's
    forms). GPT-2's fused c_attn likewise, its value rows quantized beside the new ones and
    its error the larger of the scores' and the values'."""
    out: dict[str, tuple[Stored, dict]] = {}
    for work in works:
        if work.name.endswith("." + FUSED) and work.name in room:
            products = _fused_products(work, n_heads)
            made = [largest_product(products, lambda f: _fused_stored(
                        work, products, f, settings.block_size)[0].nbytes() <= room[work.name],
                        bits, settings.block_size, grid) for bits, grid in BUDGET_BITS]
            made = [_fused_stored(work, products, f, settings.block_size) for f in made if f]
            if made:
                out[work.name] = min(made, key=lambda m: m[0].error)
    for qw, kw in pairs(works):
        if qw.name not in room or kw.name not in room:
            continue
        limit = room[qw.name] + room[kw.name]
        products = head_products(qw.w, qw.bias, kw.w, n_heads, qw.stats)

        def fits(f: ProductForm) -> bool:
            stored = _stored_pair(qw, kw, f, products.d).values()
            return sum(x.nbytes() for x in stored) <= limit

        tried = [largest_product(products, fits, bits, settings.block_size, grid)
                 for bits, grid in BUDGET_BITS]
        tried = [f for f in tried if f is not None]
        if tried:
            form = min(tried, key=lambda f: f.error)
            out.update(_noted(qw, kw, form, _stored_pair(qw, kw, form, products.d)))
    return out


def _fused(work: LayerWork, settings: Settings, n_heads: int, choose_form
           ) -> dict[str, tuple[Stored, dict]]:
    """GPT-2's c_attn: queries, keys and values in one (3·h, in) weight. The product rewrites
    the first two thirds; the values are stored quantized beside them in one weight."""
    own = choose_form(work, settings)
    products = _fused_products(work, n_heads)
    form = smallest_product(products, settings.eps, settings.bits, settings.block_size,
                            settings.grid)
    if form is None:
        return {work.name: (own, {})}
    new, notes = _fused_stored(work, products, form, settings.block_size)
    if new.error > settings.eps or new.nbytes() >= _bytes(own, work):
        return {work.name: (own, {})}
    return {work.name: (new, notes)}


def _fused_products(work: LayerWork, n_heads: int) -> HeadProducts:
    w, h, bias = work.w, work.w.shape[0] // 3, work.bias
    return head_products(w[:h], None if bias is None else bias[:h], w[h:2 * h], n_heads,
                         work.stats)


def _fused_stored(work: LayerWork, products: HeadProducts, form: ProductForm, block_size: int
                  ) -> tuple[Stored, dict]:
    """The fused layer with `form`'s query and key rows and all value rows, quantized together
    at the form's bits; its error the larger of the scores' and the values' own."""
    w, h, bias, bits = work.w, work.w.shape[0] // 3, work.bias, form.q.bits
    total, d = sum(form.ranks), products.d
    rows = runs(form.ranks, d) + runs(form.ranks, d, h) + [[2 * h, h]]
    new = torch.cat([form.q.dequantize(), form.k.dequantize(), w[2 * h:]])
    weight = quantize(new, bits, block_size, form.q.grid)
    w_hat = weight.dequantize().to(w.device).double()
    q_hat = torch.cat([w_hat[:total], form.q_bias.double().to(w.device)[:, None]], 1)
    scores = (products.error2(form.ranks, q_hat, w_hat[total:2 * total])
              / (products.total2() or 1.0)) ** 0.5
    v_ref = reference(w[2 * h:], None if bias is None else bias[2 * h:], work.stats)
    values = error_norm2(w[2 * h:] - w_hat[2 * total:].float(), work.stats) ** 0.5 / v_ref
    fused_bias = None
    if bias is not None:
        fused_bias = torch.zeros(3 * h)
        fused_bias[runs_index(runs(form.ranks, d))] = form.q_bias.cpu()
        fused_bias[2 * h:] = bias[2 * h:].cpu()
    stored = Stored("dense", 0, 3 * h, bits, max(scores, values), weight=weight, rows=rows,
                    outputs=3 * h, bias=fused_bias)
    return stored, {"attention_product": {"heads": form.ranks, "score_error": scores,
                                          "value_error": values, "pair": [work.name]}}


def _bytes(stored: Stored, work: LayerWork) -> int:
    """What a form stores (a kept layer: its weight as the model holds it)."""
    if stored.kind == "keep":
        return work.module.weight.numel() * work.module.weight.element_size()
    return stored.nbytes()
