"""Tests for svdq.calibration.collect: statistics accumulated by hooks equal those of the stored
activations, the Gram error equals the error on those activations, and hooks never leak."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from svdq.algo import error
from svdq.calibration.collect import Collector, collect

F64 = torch.float64
IN, OUT, TOKENS, BATCHES = 40, 24, 90, 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖: entries near zero carry round-off of the matrix's scale, not their own."""
    return float((a - b).norm() / b.norm())


def correlated(kind: str, seed: int = 0) -> torch.Tensor:
    """X = Z A + mean (tokens × in): correlated columns, non-zero mean.

    "integer": small integers, so the float32 per-batch Gram in `collect` is exact and the
    comparison can be to float64 round-off; "float64": Gaussian, Gram exact to float32 only.
    """
    g = _gen(seed)
    if kind == "integer":
        z = torch.randint(-3, 4, (TOKENS, IN), generator=g).to(F64)
        a = torch.randint(-2, 3, (IN, IN), generator=g).to(F64)
        return z @ a + 1
    z = torch.randn(TOKENS, IN, generator=g, dtype=F64)
    a = torch.randn(IN, IN, generator=g, dtype=F64) / IN ** 0.5
    return z @ a + 0.5


def linear(bias: bool, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias).double()


def run_batches(module: nn.Module, x: torch.Tensor, layout: str) -> None:
    with torch.no_grad():
        for xb in x.chunk(BATCHES):
            module(xb if layout == "2d" else xb.reshape(3, -1, IN))  # (batch, seq, in) too


# Tolerances: with integer inputs the per-batch float32 Gram is exact, so 1e-9 holds; with
# Gaussian float64 inputs `collect` rounds each batch's XᵀX through float32, which limits the
# agreement to ~1e-7, so 1e-6 is checked there.
CASES = [("integer", "2d", True, 1e-9), ("integer", "3d", False, 1e-9),
         ("float64", "2d", True, 1e-6), ("float64", "3d", False, 1e-6)]
CASE_IDS = ["int-2d-bias", "int-3d-nobias", "f64-2d-bias", "f64-3d-nobias"]


@pytest.mark.parametrize("kind,layout,bias,tol", CASES, ids=CASE_IDS)
def test_collect_accumulates_stats_of_all_batches(kind, layout, bias, tol):
    x = correlated(kind)
    lin = linear(bias)
    with collect({"lin": lin}) as stats:
        run_batches(lin, x, layout)
    st = stats["lin"]
    assert st.tokens == TOKENS
    assert st.gram.dtype == F64 and st.total.dtype == F64
    assert rel(st.gram, x.T @ x) < tol
    assert rel(st.total, x.sum(0)) < tol


@pytest.mark.parametrize("delta_kind", ["random", "truncation"])
@pytest.mark.parametrize("kind,layout,bias,tol", CASES, ids=CASE_IDS)
def test_gram_error_equals_error_on_stored_activations(kind, layout, bias, tol, delta_kind):
    x = correlated(kind)
    lin = linear(bias)
    with collect({"lin": lin}) as stats:
        run_batches(lin, x, layout)
    w = lin.weight.detach()
    b = None if lin.bias is None else lin.bias.detach()
    if delta_kind == "random":
        delta = torch.randn(OUT, IN, generator=_gen(2), dtype=F64) * 0.01
    else:  # W − W_k: the error a rank-k replacement makes
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        delta = w - (u[:, :8] * s[:8]) @ vt[:8]
    gram_rel = (error.error_norm2(delta, stats["lin"]) ** 0.5
                / error.output_norm2(w, b, stats["lin"]) ** 0.5)
    with torch.no_grad():
        y = lin(x)  # X Wᵀ + b, computed by the layer itself
    direct_rel = float((x @ delta.T).norm() / y.norm())
    assert gram_rel == pytest.approx(direct_rel, rel=tol)
    assert 1e-4 < direct_rel < 1  # a non-trivial error, so the comparison means something


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("raises", [True, False], ids=["body-raises", "body-returns"])
def test_collect_removes_its_hooks(raises):
    mods = {"a": linear(True), "b": linear(False, seed=3)}
    x = correlated("float64")
    if raises:
        with pytest.raises(_Boom), collect(mods) as stats:
            mods["a"](x[:30])
            raise _Boom
    else:
        with collect(mods) as stats:
            mods["a"](x[:30])
    for m in mods.values():
        assert len(m._forward_pre_hooks) == 0
    before = stats["a"].gram.clone()
    mods["a"](x)  # a forward after the block changes nothing
    mods["b"](x)
    assert torch.equal(stats["a"].gram, before) and stats["a"].tokens == 30
    assert "b" not in stats


def test_layers_fed_the_same_tensor_get_the_same_stats():
    x = correlated("float64")
    q, k, v = linear(True, 4), linear(False, 5), linear(True, 6)
    other = linear(True, 7)
    with collect({"q": q, "k": k, "v": v, "other": other}) as stats, torch.no_grad():
        for xb in x.chunk(BATCHES):
            h = torch.tanh(xb)  # a fresh tensor per batch, shared by q, k and v
            q(h), k(h), v(h)
            other(xb)
    h = torch.tanh(x)
    for name in "kv":
        assert torch.equal(stats[name].gram, stats["q"].gram)
        assert torch.equal(stats[name].total, stats["q"].total)
        assert stats[name].tokens == stats["q"].tokens == TOKENS
        # one accumulation, shared (svdq/collect.py: nothing modifies statistics in place)
        assert stats[name].gram is stats["q"].gram and stats[name] is not stats["q"]
    # each accumulated once per batch (not once per layer that shares the product)
    assert rel(stats["q"].gram, h.T @ h) < 1e-6
    assert rel(stats["other"].gram, x.T @ x) < 1e-6


def test_token_weights_weigh_every_sum_and_part_shared_inputs():
    """With `weights` a layer's sums are Σ w_t x_t x_tᵀ, Σ w_t x_t, Σ w_t |x_t| over the rows
    in order, across batches; a weighted layer shares no accumulators with the layers fed the
    same tensor (their weights differ), the unweighted ones still share theirs; more rows than
    weights is an error, not a silent wrap."""
    x = correlated("float64")
    q, k, v = linear(True, 4), linear(False, 5), linear(True, 6)
    w = torch.rand(TOKENS, generator=_gen(9), dtype=F64) * 3
    mods = {"q": q, "k": k, "v": v}
    with Collector(mods, weights={"k": w}) as collector, torch.no_grad():
        for xb in x.chunk(BATCHES):
            h = torch.tanh(xb)
            q(h), k(h), v(h)
    stats, h = collector.stats, torch.tanh(x)
    assert stats["k"].weighted and not stats["q"].weighted
    assert rel(stats["k"].gram, (h * w[:, None]).T @ h) < 1e-6
    assert rel(stats["k"].total, (h * w[:, None]).sum(0)) < 1e-6
    assert rel(stats["k"].abs_total, (h.abs() * w[:, None]).sum(0)) < 1e-6
    assert stats["k"].tokens == TOKENS
    assert rel(stats["q"].gram, h.T @ h) < 1e-6 and stats["v"].gram is stats["q"].gram
    with pytest.raises(RuntimeError, match="more input rows"), \
            Collector({"k": k}, weights={"k": w[:TOKENS - 1]}), torch.no_grad():
        k(torch.tanh(x))


def _norm_then_linear(lin: nn.Linear, x: torch.Tensor) -> None:
    # what a transformer block does: a temporary normalized input, freed after each batch,
    # whose memory the allocator hands to the next batch's temporary
    norm = nn.LayerNorm(IN, elementwise_affine=False).double()
    for xb in x.chunk(BATCHES):
        lin(norm(xb))


def _reused_buffer(lin: nn.Linear, x: torch.Tensor) -> None:
    buf = torch.empty(TOKENS // BATCHES, IN, dtype=F64)
    for xb in x.chunk(BATCHES):
        buf.copy_(xb)  # same tensor, same address, new content
        lin(buf)


def _fresh_copies(lin: nn.Linear, x: torch.Tensor) -> None:
    for xb in x.chunk(BATCHES):
        lin(xb.clone())


FEEDS = {"norm-then-linear": (_norm_then_linear, True), "reused-buffer": (_reused_buffer, False),
         "fresh-copies": (_fresh_copies, False)}


@pytest.mark.parametrize("feed", list(FEEDS), ids=list(FEEDS))
def test_each_batch_counts_even_when_memory_is_reused(feed):
    # Regression: the per-batch product used to be cached by (data_ptr, shape), so a new batch
    # landing at the address of the previous one reused the previous batch's Gram.
    fn, normed = FEEDS[feed]
    x = correlated("float64")
    lin = linear(True)
    with collect({"lin": lin}) as stats, torch.no_grad():
        fn(lin, x)
    if normed:
        x = torch.cat([torch.nn.functional.layer_norm(xb, (IN,)) for xb in x.chunk(BATCHES)])
    assert stats["lin"].tokens == TOKENS
    assert rel(stats["lin"].gram, x.T @ x) < 1e-6
    assert rel(stats["lin"].total, x.sum(0)) < 1e-6


def test_inference_mode_inputs_are_accepted():
    x = correlated("float64")
    lin = linear(True)
    with collect({"lin": lin}) as stats, torch.inference_mode():
        for xb in x.chunk(BATCHES):
            lin(xb * 1.0)
    assert rel(stats["lin"].gram, x.T @ x) < 1e-6


def test_block_statistics_match_the_inputs_each_layer_saw():
    # End to end on a tiny GPT-2 block, the way `compress` drives it (capture, then
    # run_block per batch). With the old data_ptr cache, c_fc's Gram came out ~6% off when the
    # allocator gave a batch's LayerNorm output the previous one's address (allocator-dependent;
    # test_each_batch_counts_even_when_memory_is_reused[reused-buffer] is the deterministic guard).
    import transformers
    from conftest import tiny_config

    from svdq.models import blocks as calibrate

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(tiny_config("gpt2", 120)).eval()
    block = model.transformer.h[0]
    ids = torch.randint(0, 120, (6, 32), generator=_gen(8))
    captured = calibrate.capture(model, ids, batch_size=2)
    inputs = [(h, captured.kwargs[0][b]) for b, h in enumerate(captured.hidden)]
    assert len(inputs) == 3
    mods = {"attn": block.attn.c_attn, "fc": block.mlp.c_fc, "proj": block.mlp.c_proj}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    spies = [m.register_forward_pre_hook(
        lambda mod, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
        for n, m in mods.items()]
    try:
        with collect(mods) as stats:
            for hidden, kw in inputs:
                calibrate.run_block(block, hidden, kw)
    finally:
        for s in spies:
            s.remove()
    for n in mods:
        x = torch.cat(seen[n])
        assert stats[n].tokens == 6 * 32
        assert rel(stats[n].gram, x.T @ x) < 1e-6, n
        assert rel(stats[n].total, x.sum(0)) < 1e-6, n


@pytest.mark.parametrize("n", [5, 128, 300, 700])
def test_a_gram_made_from_its_upper_blocks_and_mirrored_is_the_whole_product(n):
    """Grams are accumulated in their upper triangle's blocks only (`_add_products` with b is
    a) and mirrored when read; a product of two streams (--refit's cross term) is made whole."""
    from svdq.calibration import collect as c
    g = torch.Generator().manual_seed(n)
    a = torch.randn(3000, n, generator=g) * torch.linspace(0.1, 3, n)
    b = torch.randn(3000, n, generator=g)
    gram, cross = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    c._add_products(gram, a, a)
    c._add_products(gram, a[:100], a[:100])  # a second batch adds to the upper blocks only
    c._add_products(cross, a, b)
    exact = a.double().T @ a.double() + a[:100].double().T @ a[:100].double()
    if n > c.SYMMETRIC:
        assert not torch.allclose(gram, exact, rtol=1e-5)  # the lower blocks are not made
    got = c.mirrored(gram)
    assert got is gram and torch.equal(got, got.T)
    assert torch.allclose(got, exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    assert torch.allclose(cross, a.double().T @ b.double(), rtol=1e-5,
                          atol=1e-5 * float(exact.abs().max()))
