"""Gradient (Fisher) statistics from the calibration text and the Fisher-weighted SVD (FWSVD).

`calibration.gradients` is checked against per-sample gradients computed here independently with
plain autograd (param.grad after one backward per sample, a full backward hook for ∂L/∂y);
`fisher` against Eckart–Young on the row-weighted weight.
"""
from __future__ import annotations

import pytest
import torch

import svdq
from svdq import artifact, runtime
from svdq.algo import factorize as fz
from svdq.algo.factorize import LayerStats, factorize
from svdq.calibration.gradients import gradients
from svdq.calibration.loss import draw
from svdq.config import Settings
from svdq.models import layers as surgery
from svdq.models import load as hf
from svdq.pipeline.compress import compress
from svdq.pipeline.inputs import calibration_ids
from svdq.pipeline.analyse import analyse
from svdq.pipeline.work import Clock

from conftest import make_text

CALIB = dict(calib_samples=4, calib_len=32, batch_size=4)


# ----------------------------------------------------------------------------- the method
@pytest.fixture(scope="module")
def weighted_layer():
    """A 24×40 weight and row weights spanning two decades, in shuffled order."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    r = torch.logspace(0, -2, 24, dtype=torch.float64)[torch.randperm(24, generator=g)]
    x = torch.randn(100, 40, generator=g, dtype=torch.float64)
    stats = LayerStats(x.T @ x, x.sum(0), 100, x.abs().sum(0), row_fisher=r ** 2, grad2=1.0)
    return w, r, stats


def weighted_error2(w, r, f, k) -> float:
    """Σ_i r_i² ‖(W − Ŵ_k)_i‖², what FWSVD minimizes."""
    w_hat = (f.u[:, :k].double() * f.s[:k].double()) @ f.vt[:k].double()
    return float(((w - w_hat) * r[:, None]).pow(2).sum())


def test_fisher_beats_plain_svd_in_the_weighted_error_at_every_rank(weighted_layer):
    w, r, stats = weighted_layer
    fisher, plain = factorize("fisher", w.float(), stats), factorize("svd", w.float(), stats)
    ours = [weighted_error2(w, r, fisher, k) for k in range(1, 24)]
    theirs = [weighted_error2(w, r, plain, k) for k in range(1, 24)]
    for k, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a <= b * (1 + 1e-5), (k, a, b)
    assert sum(ours) < 0.5 * sum(theirs)  # not merely equal: the weighting pays, and a lot
    # optimal, not just better: Eckart–Young on diag(r) W, the tail of its singular values
    tail = torch.linalg.svdvals(w * r[:, None]).pow(2).flip(0).cumsum(0).flip(0)
    for k in (1, 6, 15, 23):
        assert ours[k - 1] == pytest.approx(float(tail[k]), rel=1e-4)


def test_fisher_factors_reconstruct_and_keep_unit_columns(weighted_layer):
    w, _, stats = weighted_layer
    f = factorize("fisher", w.float(), stats)
    assert f.u.shape == (24, 24) and f.s.shape == (24,) and f.vt.shape == (24, 40)
    assert f.u.dtype == f.s.dtype == f.vt.dtype == torch.float32
    assert torch.allclose((f.u * f.s) @ f.vt, w.float(), atol=1e-4)
    assert torch.allclose(f.u.norm(dim=0), torch.ones(24), atol=1e-5)
    assert torch.allclose(f.vt @ f.vt.T, torch.eye(24), atol=1e-5)  # rows of vt orthonormal
    assert bool((f.s > 0).all())


def test_fisher_with_uniform_weights_is_plain_svd(weighted_layer):
    """Equal row weights change nothing; zero statistics (no gradient) fall back to the same."""
    w, _, stats = weighted_layer
    plain = factorize("svd", w.float(), stats)
    for fisher in (torch.full((24,), 3.0, dtype=torch.float64),
                   torch.zeros(24, dtype=torch.float64)):
        f = factorize("fisher", w.float(), LayerStats(stats.gram, stats.total, stats.tokens,
                                                      row_fisher=fisher))
        assert torch.allclose(f.s, plain.s, rtol=1e-5)
        # float32 factors of entries up to ≈3 through two LAPACK paths: 3e-5 apart on some CPUs
        assert torch.allclose((f.u[:, :5] * f.s[:5]) @ f.vt[:5],
                              (plain.u[:, :5] * plain.s[:5]) @ plain.vt[:5], atol=1e-4)


def test_fisher_keeps_a_dead_row_finite():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 12, generator=g)
    fisher = torch.rand(8, generator=g, dtype=torch.float64)
    fisher[3] = 0.0
    f = factorize("fisher", w, LayerStats(torch.eye(12), torch.zeros(12), 1, row_fisher=fisher))
    assert all(bool(torch.isfinite(t).all()) for t in (f.u, f.s, f.vt))
    assert torch.allclose((f.u * f.s) @ f.vt, w, atol=1e-4)


def test_fisher_needs_gradient_statistics(weighted_layer):
    w, _, stats = weighted_layer
    with pytest.raises(ValueError, match=r"LayerStats\.row_fisher"):
        factorize("fisher", w.float(), LayerStats(stats.gram, stats.total, stats.tokens))


def test_fisher_is_a_valid_method():
    assert Settings(method="fisher").method == "fisher"


# ----------------------------------------------------------------------------- gradients
def sample_ids(tokenizer, samples: int = 3, length: int = 16, seed: int = 7) -> torch.Tensor:
    ids = tokenizer(make_text(samples * length * 2, seed), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: samples * length]).view(samples, length)


def logits_of(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def loaded(models):
    return {arch: hf.load_source(str(models[arch])) for arch in ("gpt2", "llama", "bert")}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_gradients_shapes_and_state_restored(loaded, arch):
    source = loaded[arch]
    model = source.model
    names = surgery.targets(model, (), ())
    modules = {n: model.get_submodule(n) for n in names}
    ids = sample_ids(source.tokenizer)
    before = logits_of(model, ids)
    # unusual state that must survive: a frozen parameter and a stale gradient on a target
    params = dict(model.named_parameters())
    frozen = next(n for n in params if n not in {f"{m}.weight" for m in names})
    params[frozen].requires_grad_(False)
    stale = torch.full_like(params[f"{names[0]}.weight"], 0.5)
    params[f"{names[0]}.weight"].grad = stale
    state = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    calls = []
    try:
        with torch.no_grad():  # gradients turns autograd on by itself
            got = gradients(model, ids, modules, source.is_causal, 0, lambda *a: calls.append(a))
        assert {n: (p.requires_grad, p.grad) for n, p in params.items()} == state
        assert params[f"{names[0]}.weight"].grad is stale and bool((stale == 0.5).all())
    finally:
        params[frozen].requires_grad_(True)
        params[f"{names[0]}.weight"].grad = None
    assert set(got) == set(names)
    for name, module in modules.items():
        row_fisher, grad2 = got[name]
        assert row_fisher.shape == (surgery.weight_of(module).shape[0],), name  # (out,), Conv1D too
        assert row_fisher.dtype == torch.float64
        assert bool(torch.isfinite(row_fisher).all()) and bool((row_fisher > 0).all()), name
        assert isinstance(grad2, float) and 0 < grad2 < float("inf"), name
        assert not module._forward_hooks and not module.weight._post_accumulate_grad_hooks
    steps = 2 * len(surgery.blocks_of(model)[1]) + 1  # each block forward, the head, backward
    assert calls == [("gradients", i, steps) for i in range(steps + 1)]
    assert not model.training
    assert torch.equal(logits_of(model, ids), before)


def reference_gradients(model, ids, module, loss_of):
    """Σ_s Σ_j (∂L_s/∂W_ij)² per row and Σ ‖∂L_s/∂y‖², with plain autograd, one sample at a time."""
    transposed = isinstance(module, surgery.conv1d_type())
    seen = []
    handle = module.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].detach()))
    rows, grad2 = 0, 0.0
    try:
        for s in range(ids.shape[0]):
            model.zero_grad(set_to_none=True)
            loss_of(ids[s: s + 1]).backward()
            g = module.weight.grad.double()
            rows = rows + (g.T if transposed else g).pow(2).sum(1)
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    grad2 = sum(float(g.double().pow(2).sum()) for g in seen)
    assert len(seen) == ids.shape[0]
    return rows, grad2


@pytest.mark.parametrize("arch,target", [("llama", "model.layers.1.mlp.down_proj"),
                                         ("llama", "model.layers.0.self_attn.k_proj"),
                                         ("gpt2", "transformer.h.0.attn.c_attn")])
def test_gradients_equal_per_sample_autograd(loaded, arch, target):
    """The causal loss is transformers' own (labels=ids) here, computed in the usual way."""
    model = loaded[arch].model
    ids = sample_ids(loaded[arch].tokenizer)
    module = model.get_submodule(target)
    modules = {n: model.get_submodule(n) for n in surgery.targets(model, (), ())}
    got_rows, got_grad2 = gradients(model, ids, modules, True, 0)[target]
    rows, grad2 = reference_gradients(
        model, ids, module, lambda s: model(input_ids=s, labels=s, use_cache=False).loss)
    assert got_rows.shape == rows.shape
    assert torch.allclose(got_rows, rows, rtol=1e-5, atol=0)
    assert got_grad2 == pytest.approx(grad2, rel=1e-5)
    # a per-sample sum, not the square of the summed gradient: that would be another number
    model.zero_grad(set_to_none=True)
    sum(model(input_ids=ids[s: s + 1], labels=ids[s: s + 1]).loss for s in range(3)).backward()
    g = module.weight.grad.double()
    model.zero_grad(set_to_none=True)
    summed = (g.T if isinstance(module, surgery.conv1d_type()) else g).pow(2).sum(1)
    assert not torch.allclose(got_rows, summed, rtol=1e-2)


def test_per_token_gradients_are_each_sample_own_and_add_up_to_grad2(loaded):
    """`per_token`: one (T,) vector of ‖∂L_s/∂y_t‖² per sample, in the order of ids, equal to
    plain autograd's; summed, the layer's grad2."""
    model = loaded["llama"].model
    ids = sample_ids(loaded["llama"].tokenizer)
    target = "model.layers.0.self_attn.k_proj"
    modules = {n: model.get_submodule(n) for n in surgery.targets(model, (), ())}
    per_token: dict = {}
    _, grad2 = gradients(model, ids, modules, True, 0, fisher=False, per_token=per_token)[target]
    assert set(per_token) == set(modules)
    got = per_token[target]
    assert [t.shape for t in got] == [(ids.shape[1],)] * ids.shape[0]
    seen = []
    module = model.get_submodule(target)
    handle = module.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].detach()))
    try:
        for s in range(ids.shape[0]):
            model(input_ids=ids[s: s + 1], labels=ids[s: s + 1], use_cache=False).loss.backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    for mine, theirs in zip(got, seen):
        assert torch.allclose(mine, theirs[0].float().pow(2).sum(-1), rtol=1e-4, atol=1e-12)
    assert float(sum(t.double().sum() for t in got)) == pytest.approx(grad2, rel=1e-5)


def test_sampled_labels_give_the_fisher_of_the_model_own_predictions(loaded):
    """SAMPLED: each position's label drawn from the model's next-token distribution (one
    generator seeded by `seed`, sequence after sequence), not the text's next token."""
    model = loaded["llama"].model
    ids = sample_ids(loaded["llama"].tokenizer)
    target = "model.layers.1.mlp.down_proj"
    modules = {n: model.get_submodule(n) for n in surgery.targets(model, (), ())}
    text = gradients(model, ids, modules, True, 0)[target]
    got_rows, got_grad2 = gradients(model, ids, modules, True, 0, sampled=True)[target]
    generator, drawn = torch.Generator().manual_seed(0), []

    def loss_of(s):
        logits = model(input_ids=s, use_cache=False).logits[0, :-1]
        drawn.append(draw(logits, generator))
        return torch.nn.functional.cross_entropy(logits.float(), drawn[-1])
    rows, grad2 = reference_gradients(model, ids, model.get_submodule(target), loss_of)
    assert torch.allclose(got_rows, rows, rtol=1e-5, atol=0)
    assert got_grad2 == pytest.approx(grad2, rel=1e-5)
    labels = torch.stack(drawn)
    assert (labels != ids[:, 1:]).float().mean() > 0.5  # the model's guesses, not the text
    assert got_grad2 != pytest.approx(text[1], rel=1e-2)
    assert gradients(model, ids, modules, True, 0, sampled=True)[target][1] == got_grad2  # seeded


def test_surrogate_gradients_on_an_encoder(loaded):
    """Bare BERT: L_s = mean_t rᵀ h_t with r ~ N(0, I) per sample, fixed by the seed."""
    source = loaded["bert"]
    assert not source.is_causal
    model = source.model
    ids = sample_ids(source.tokenizer)
    modules = {n: model.get_submodule(n) for n in surgery.targets(model, (), ())}
    a = gradients(model, ids, modules, False, 0)
    b = gradients(model, ids, modules, False, 0)
    c = gradients(model, ids, modules, False, 1)
    name = "encoder.layer.1.output.dense"
    assert torch.equal(a[name][0], b[name][0]) and a[name][1] == b[name][1]
    assert not torch.allclose(a[name][0], c[name][0])
    # checked against autograd with the same draws of r
    gen = torch.Generator().manual_seed(0)
    draws = [torch.randn(64, generator=gen, dtype=torch.float64).float() for _ in range(3)]
    it = iter(draws)
    rows, grad2 = reference_gradients(
        model, ids, modules[name],
        lambda s: (model(input_ids=s).last_hidden_state @ next(it)).mean())
    assert torch.allclose(a[name][0], rows, rtol=1e-5)
    assert a[name][1] == pytest.approx(grad2, rel=1e-5)


def test_gradients_refuse_one_token_sequences(loaded):
    model = loaded["llama"].model
    with pytest.raises(svdq.errors.SvdqError, match="calib-len"):
        gradients(model, torch.ones(2, 1, dtype=torch.long), {}, True, 0)


# ----------------------------------------------------------------------------- compress
def test_walk_attaches_gradient_statistics_only_when_asked(models, calib_file):
    for method, flag, expected in (("svd", False, ()), ("svd", True, ("grad2",)),
                                   ("fisher", False, ("grad2", "row_fisher"))):
        source = hf.load_source(str(models["llama"]))
        settings = Settings(method=method, calib=str(calib_file), **CALIB)
        clock = Clock()
        ids = calibration_ids(source, settings, lambda *a: None, {})
        works = analyse(source, settings, ids, lambda *a: None, clock, gradients=flag)
        assert len(works) == 14
        for work in works:
            st = work.stats
            assert (st.row_fisher is not None) == ("row_fisher" in expected)
            assert (st.grad2 is not None) == ("grad2" in expected)
            if expected:
                assert st.grad2 > 0
            if "row_fisher" in expected:
                assert st.row_fisher.shape == (work.w.shape[0],)
        assert ("gradients" in clock.spent) == bool(expected)


def test_compress_with_fisher_end_to_end(models, calib_file, tmp_path, monkeypatch):
    seen = []
    original = fz.METHODS["fisher"]

    def spy(w, stats, dtype):
        seen.append(stats.row_fisher)
        return original(w, stats, dtype)
    monkeypatch.setitem(fz.METHODS, "fisher", spy)
    source = hf.load_source(str(models["llama"]))
    settings = Settings(method="fisher", eps=0.35, bits=8, calib=str(calib_file), **CALIB)
    result = compress(source, settings)
    assert len(seen) == len(result.layers) == 14 and all(f is not None for f in seen)
    assert "gradients" in result.timings
    kinds = {p["kind"] for p in result.layers}
    assert "lowrank" in kinds, result.layers
    manifest = artifact.save(tmp_path / "out", source, result, settings)
    assert manifest["settings"]["_data"]["method"] == "fisher"
    ids = sample_ids(source.tokenizer)
    loaded = svdq.load(tmp_path / "out", dequantize=True)
    assert sum(isinstance(m, runtime.LowRankLinear) for m in loaded.modules()) == \
        sum(p["kind"] == "lowrank" for p in result.layers)
    assert torch.equal(logits_of(loaded, ids), logits_of(result.model, ids))
