"""A budget's token probe (svdq/pipeline/probe.py): each option's cost weighed by where its
errors fall among the tokens, from the gradient pass's per-token ‖g‖² and the inputs of the
same tokens; the walk pairs the two token for token."""
from __future__ import annotations

import pytest
import torch

from svdq.algo.allocate import Option
from svdq.algo.dense import hold
from svdq.algo.factorize import Factors, LayerStats
from svdq.algo.residual import Residual
from svdq.calibration.gradients import gradients
from svdq.config import Settings
from svdq.models import load as hf
from svdq.models.layers import targets
from svdq.pipeline import probe
from svdq.pipeline.walk import Walker
from svdq.pipeline.work import Clock, LayerWork


class Shifted:
    """A stand-in quantized weight: the layer's weight plus a given error."""

    def __init__(self, w, delta):
        self.w = w + delta

    def dequantize(self):
        return self.w.clone()


def factor(work, quantized):
    """The factor of a plain int4 g64 form quantized as `quantized` (held, as prequantize
    holds GPTQ's)."""
    hold(work.w, work.stats, {(4, 64, "int"): quantized})
    return probe.factors(work, [Option(20, 0.1, "dense", 0, 4, grid="int")],
                         Settings(gptq=True, block_size=64))[0]


def work_with(x, weights, out=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, x.shape[1], generator=g)
    stats = LayerStats(x.double().T @ x.double(), x.double().sum(0), len(x), probe=x,
                       token_g2=weights)
    return LayerWork("layer", torch.nn.Linear(x.shape[1], out), w, None, stats)


def test_factor_is_one_where_gradients_weigh_every_token_alike():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    work = work_with(x, torch.full((50,), 3.0))
    delta = 0.01 * torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    assert factor(work, Shifted(work.w, delta)) == pytest.approx(1.0, rel=1e-6)


def test_factor_weighs_each_token_error_by_its_own_gradient():
    """Errors on a few huge-input tokens whose gradient is small (Gemma's down projections):
    the factor falls far below 1; it is Σ w_t‖e_t‖² / (mean w · Σ‖e_t‖²) exactly."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 8, generator=g)
    x[:2] *= 30  # two outlier tokens ...
    weights = torch.ones(40)
    weights[:2] = 0.01  # ... that the loss hardly sees
    work = work_with(x, weights)
    delta = 0.01 * torch.randn(6, 8, generator=g)
    e2 = (x.double() @ delta.double().T).pow(2).sum(-1)
    want = float((weights.double() * e2).sum() / (weights.double().mean() * e2.sum()))
    got = factor(work, Shifted(work.w, delta))
    assert got == pytest.approx(want, rel=1e-4) and got < 0.2


def test_no_probe_no_gradient_or_no_error_gives_one():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(4))
    work = work_with(x, torch.zeros(10))
    assert factor(work, Shifted(work.w, torch.ones(6, 4))) == 1.0  # no gradient
    work = work_with(x, torch.ones(10))
    assert factor(work, Shifted(work.w, torch.zeros(6, 4))) == 1.0  # no error
    work.stats.probe = None
    opts = [Option(10, 0.0, "keep", 0, None), Option(4, 0.1, "dense", 0, 4)]
    assert probe.factors(work, opts, Settings()) == [1.0, 1.0]


def test_options_take_their_grid_factor_and_the_rest_one():
    """A correction takes its base's factor; kept and low-rank-alone options 1; each grid's
    weight the one prequantize holds."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 8, generator=g)
    x[0] *= 20
    weights = torch.rand(30, generator=g) + 0.1
    weights[0] = 0.001
    work = work_with(x, weights)
    settings = Settings(gptq=True, block_size=64)
    a = Shifted(work.w, 0.01 * torch.randn(6, 8, generator=g))
    b = Shifted(work.w, 0.01 * torch.randn(6, 8, generator=g))
    hold(work.w, work.stats, {(4, 64, "int"): a, (8, 64, "bnb"): b})
    opts = [Option(100, 0.0, "keep", 0, None), Option(20, 0.1, "dense", 0, 4, grid="int"),
            Option(30, 0.05, "residual", 2, 4, grid="int"), Option(40, 0.01, "dense", 0, 8),
            Option(25, 0.2, "lowrank", 2, 8), Option(90, 0.3, "dense", 0, 3, grid="int")]
    got = probe.factors(work, opts, settings)
    fa, fb = factor(work, a), factor(work, b)
    assert got == [1.0, fa, fa, fb, 1.0, 1.0]  # int3 is not held: not made again with GPTQ
    assert fa < 1 and fb < 1 and fa != fb


def walked(models, calib_file, batch_size):
    """The tiny Llama, budget settings, 4 × 16 random ids and each layer's per-token ‖g‖² on
    them (the gradient pass as the walk runs it, text labels)."""
    source = hf.load_source(str(models["llama"]))
    settings = Settings(budget_ratio=0.3, calib=str(calib_file), calib_samples=4,
                        calib_len=16, batch_size=batch_size)
    model = source.model
    ids = torch.randint(0, model.config.vocab_size, (4, 16),
                        generator=torch.Generator().manual_seed(0))
    per_token: dict = {}
    gradients(model, ids, {n: model.get_submodule(n) for n in targets(model, (), ())}, True, 0,
              per_token=per_token)
    return source, settings, ids, per_token


def inputs_of(model, names, ids) -> dict:
    """Each named layer's inputs (tokens × in) in one plain forward of `ids`."""
    seen: dict = {}

    def keep(name):
        def hook(module, args):  # returns None: the input flows on unchanged
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
        return hook
    hooks = [model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def test_the_walk_pairs_the_probe_inputs_with_their_gradients(models, calib_file):
    """Walker.gradients(probe=2) keeps the first two sequences' per-token ‖g‖²; pass 1's
    statistics keep those sequences' inputs, token for token: here each layer's probe rows
    equal its inputs in a plain forward of those sequences, and its token weights the
    gradient pass's own."""
    source, settings, ids, per_token = walked(models, calib_file, 4)
    seen = inputs_of(source.model, per_token, ids[:2])
    walker = Walker(source, settings, lambda *a: None, Clock())
    walker.gradients(ids, fisher=False, probe=2)
    walker.start(ids)
    works = walker.enter(0)
    assert works and walker.probe == 32
    for work in works:
        assert work.stats.probe.shape == (32, work.w.shape[1])
        assert torch.allclose(work.stats.probe, seen[work.name], atol=1e-5)
        want = torch.cat(per_token[work.name][:2])
        assert torch.allclose(work.stats.token_g2, want, rtol=1e-5)
        assert float(work.stats.token_g2.sum()) > 0
    walker.close()
    walker = Walker(source, settings, lambda *a: None, Clock())  # at most 20 tokens
    walker.gradients(ids, fisher=False, probe=2, tokens=20)
    walker.start(ids)
    for work in walker.enter(0):
        assert work.stats.probe.shape[0] == len(work.stats.token_g2) == 20
        assert torch.allclose(work.stats.probe, seen[work.name][:20], atol=1e-5)
    walker.close()


def test_curve_takes_a_correction_off_rank_by_rank():
    """`curve` against the corrected error made directly at every rank, for factors whose u
    is not orthogonal; a corrected option's factor is the curve's at its rank."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 8, generator=g)
    x[:3] *= 10
    weights = torch.rand(40, generator=g)
    work = work_with(x, weights)
    q = Shifted(work.w, 0.1 * torch.randn(6, 8, generator=g))
    f = Factors(torch.randn(6, 4, generator=g), torch.rand(4, generator=g) + 0.5,
                torch.randn(4, 8, generator=g))
    weighted, plain = probe.curve(work, q, f)
    assert weighted.shape == plain.shape == (5,)
    for k in range(5):
        corrected = work.w - q.dequantize() - (f.u[:, :k] * f.s[:k]) @ f.vt[:k]
        e2 = (x.double() @ corrected.double().T).pow(2).sum(-1)
        assert float(plain[k]) == pytest.approx(float(e2.sum()), rel=1e-4)
        assert float(weighted[k]) == pytest.approx(float((weights.double() * e2).sum()), rel=1e-4)
    res = Residual(q, f)
    opts = [Option(20, 0.1, "dense", 0, 4, grid="int"),
            Option(30, 0.05, "residual", 2, 4, grid="int")]
    got = probe.factors(work, opts, Settings(gptq=True, block_size=64), {(4, 64, "int"): res})
    mean = float(weights.double().mean())
    assert got == pytest.approx([float(weighted[k] / (mean * plain[k])) for k in (0, 2)])


def test_the_walk_weighs_each_token_by_its_own_gradient(models, calib_file):
    """Walker.gradients(weigh=True) on every calibration sequence: pass 1's statistics on
    those ids are Σ w_t x_t x_tᵀ with w_t = ‖g_t‖² over its mean at each layer (the gradient
    pass's own), the probe's factors are then 1; statistics on other ids are not weighted."""
    source, settings, ids, per_token = walked(models, calib_file, 2)
    seen = {n: x.double() for n, x in inputs_of(source.model, per_token, ids).items()}
    walker = Walker(source, settings, lambda *a: None, Clock())
    walker.gradients(ids, fisher=False, probe=2, weigh=True)
    walker.start(ids)
    works = walker.enter(0)
    assert works
    for work in works:
        w = torch.cat(per_token[work.name]).double()
        w = w / w.mean()
        x = seen[work.name]
        assert work.stats.weighted and work.stats.tokens == len(x)
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        assert rel(work.stats.gram, (x * w[:, None]).T @ x) < 1e-5
        assert rel(work.stats.total, (x * w[:, None]).sum(0)) < 1e-5
        assert rel(work.stats.gram, x.T @ x) > 0.01  # the weights matter here
        opts = [Option(20, 0.1, "dense", 0, 4, grid="int")]
        assert probe.factors(work, opts, Settings(block_size=64)) == [1.0]
    walker.close()
    walker = Walker(source, settings, lambda *a: None, Clock())
    walker.gradients(ids[:2], fisher=False, weigh=True)  # --fast: gradients on some sequences
    walker.start(ids)
    assert not any(work.stats.weighted for work in walker.enter(0))
    walker.close()
