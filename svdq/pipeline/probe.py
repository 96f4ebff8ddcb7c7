"""Each token's error weighed by its own loss gradient: a budget's token probe (causal LMs).

A budget weighs a layer's relative output error² by its sensitivity, Σ_t‖g_t‖² / (T · out) ·
‖X Wᵀ‖²: the gradient's energy and the error's, each averaged over the tokens on its own. The
loss, to second order, is ½ Σ_t (g_t · e_t)² for labels the model draws itself (the Fisher),
e_t the layer's output error at token t; the two agree only where a token's error does not
depend on how much its gradient weighs. On Gemma-3-270M they do not: its MLP's down
projections see a few tokens with inputs far larger than the rest, which hold most of GPTQ's
error and little of the gradient, and the separate averages put 58% of a GPTQ int4 g64 model's
estimated damage in them where the measured KL puts 27% and Σ_t (g_t · e_t)² 21%;
Σ_t ‖g_t‖² ‖e_t‖² / out, each token's error weighed by its own gradient, 21% too
(`benchmarks/gptq/curvature.py`, RESULTS.md, session 32).

So a budget keeps a probe — the inputs x_t of the first calibration tokens the gradient pass
saw (`LayerStats.probe`) and each one's ‖g_t‖² at the layer (`LayerStats.token_g2`) — and
multiplies each option's cost by its `factors`: Σ_t ‖g_t‖² ‖e_t‖² over (mean_t ‖g_t‖² ·
Σ_t ‖e_t‖²), e_t the option's output error at token t (Q − W) x_t, Q the layer quantized on
its grid, with a correction's terms taken off at its rank (`curve`). It is 1 where errors and
gradients are spread alike over the tokens, below 1 where the errors sit on tokens the loss
hardly sees. A correction's factor is its own, not its base's: the whitened SVD spends the
rank where the inputs are large, so what it removes need not be what the loss sees. An
option without a quantized base (kept, low rank alone) takes 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from svdq.algo.allocate import Option
from svdq.algo.dense import held, quantize_weight
from svdq.algo.factorize import Factors
from svdq.algo.residual import Residual
from svdq.config import Settings
from svdq.pipeline.work import LayerWork

if TYPE_CHECKING:
    from svdq.pipeline.walk import Walker

# A causal LM's sensitivities from labels it draws itself: the Fisher information, the
# curvature of the loss, where the text's next tokens give the empirical Fisher, a biased
# stand-in (`--fast` on Gemma-3-270M 0.75 better, SmolLM2 -0.11 to +0.17: RESULTS.md, session
# 31; the token probe below then weighs each token's error by its own gradient, session 32)
SAMPLED = True
# ... and where the gradient pass saw every calibration sequence (not `--fast`), the
# statistics themselves may weigh each token by its own ‖g_t‖² (`LayerStats.weighted`): GPTQ,
# the whitened corrections and the errors all see Σ_t ‖g_t‖² x_t x_tᵀ, and the probe's factor
# is 1. Off: on Gemma-3-270M it took GPTQ w4 g64's bytes 59.07 → 57.80 but w3 g64's 74.32 →
# 80.58 (`--fast` with every sequence's gradients; RESULTS.md, session 33)
WEIGHED = False
PROBE = 2  # calibration sequences in the probe (at most those the gradient pass saw) ...
TOKENS = 1024  # ... and at most this many of their tokens (the first)


def gradients(walker: "Walker", ids: torch.Tensor, fisher: bool, scale: float = 1.0) -> None:
    """A budget's gradient statistics (`Walker.gradients`): for a causal LM the labels drawn
    from its own predictions (`SAMPLED`) and the token probe (`PROBE` sequences, at most
    `TOKENS` tokens) and, on all of them (`scale` 1), its token-weighted statistics
    (`WEIGHED`); an encoder's or image model's as they are."""
    causal = walker.source.is_causal
    walker.gradients(ids, fisher=fisher, scale=scale, sampled=causal and SAMPLED,
                     probe=PROBE if causal else 0, tokens=TOKENS,
                     weigh=causal and WEIGHED and scale == 1.0)


def curve(work: LayerWork, quantized, factors: Factors | None = None) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """(Σ_t ‖g_t‖² ‖e_t‖², Σ_t ‖e_t‖²) over the probe's tokens, float64, for the layer
    quantized as `quantized` and then corrected at each rank k = 0..R of `factors` (factors of
    W − Q: e_t(k) = r_t − Σ_{j<k} (v_j · x_t) σ_j u_j, r_t = (W − Q) x_t), R + 1 values each
    (one without factors): every rank from one pass, the correction's terms added one by one."""
    x, weights = work.stats.probe, work.stats.token_g2.to(work.stats.probe.device)
    residual = quantized.dequantize().to(x.device)
    residual.neg_().add_(work.w.to(x.device))  # W − Q in place: one out × in copy
    r = x @ residual.T  # T × out: what the quantization lost at each token
    del residual
    r2 = r.pow(2).sum(-1).double()
    weighted, plain = (weights.double() * r2).sum().reshape(1), r2.sum().reshape(1)
    if factors is None or not len(factors.s):
        return weighted, plain
    b = factors.u.to(x.device).float() * factors.s.to(x.device).float()  # out × R
    a = x @ factors.vt.to(x.device).float().T  # T × R
    gram = b.T @ b
    steps = (-2 * a * (r @ b) + 2 * a * (a @ gram.triu(1)) + a.pow(2) * gram.diagonal()).double()
    return (torch.cat([weighted, weighted + (weights.double()[:, None] * steps).sum(0).cumsum(0)]),
            torch.cat([plain, plain + steps.sum(0).cumsum(0)]))


def _ratio(weighted: float, plain: float, mean: float) -> float:
    return 1.0 if plain <= 0.0 or mean <= 0.0 or weighted < 0.0 else weighted / (mean * plain)


def factors(work: LayerWork, options: list[Option], settings: Settings,
            residuals: dict[tuple, Residual] | None = None) -> list[float]:
    """Each option's factor (see the module's docstring): a plain form's from its grid's
    quantized weight, the one `prequantize` holds (with GPTQ: no grid quantized again here);
    a corrected one's at its rank, from its base's factors in `residuals`
    ({(bits, block, grid): Residual}; a base not there: its plain factor)."""
    st = work.stats
    if st.weighted or st.probe is None or st.token_g2 is None or not len(st.token_g2):
        return [1.0] * len(options)
    kept, curves, residuals = held(work.w, st) or {}, {}, residuals or {}
    mean = float(st.token_g2.double().mean())
    out = []
    for o in options:
        if o.kind not in ("dense", "residual") or o.bits is None or o.bits >= 16:
            out.append(1.0)
            continue
        key = (o.bits, o.block or settings.block_size, o.grid)
        if key not in curves:
            res = residuals.get(key)
            q = res.weight if res is not None else kept.get(key)
            if q is None and not settings.gptq:  # rounding: cheap to make again
                q = quantize_weight(work.w, st, *key)
            curves[key] = None if q is None else curve(work, q, None if res is None
                                                       else res.factors)
        if curves[key] is None:
            out.append(1.0)
            continue
        weighted, plain = curves[key]
        k = min(o.rank if o.kind == "residual" else 0, len(plain) - 1)
        out.append(_ratio(float(weighted[k]), float(plain[k]), mean))
    return out
