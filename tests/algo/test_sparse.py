"""The sparse term's math: CSR bytes exact and round trips bit for bit, the saliency picks
what costs the output most, GoDec never raises the stored error, and low rank + spikes is
recovered."""
from __future__ import annotations

import torch

from svdq.algo import sparse
from svdq.algo.error import error_norm2
from svdq.algo.factorize import LayerStats
from svdq.algo.quant import quantize


def stats_of(x: torch.Tensor) -> LayerStats:
    x = x.double()
    return LayerStats(x.T @ x, x.sum(0), x.shape[0])


def test_csr_round_trips_bit_for_bit_and_counts_its_bytes():
    g = torch.Generator().manual_seed(0)
    for in_f in (50, 40000):  # int16 columns, then int32
        m = torch.zeros(7, in_f)
        idx = torch.randperm(7 * in_f, generator=g)[:30]
        m.view(-1)[idx] = torch.randn(30, generator=g)
        m[3, in_f - 1] = 1.5  # the last column: above 32767 in the wide case
        csr = sparse.CSR.of(m)
        assert torch.equal(csr.dense(), m.to(torch.float16).float())
        assert csr.nbytes() == sparse.csr_bytes(7, in_f, csr.nnz)
        assert csr.cols.dtype == (torch.int16 if in_f <= sparse.INT16_COLUMNS else torch.int32)
        assert set(csr.tensors("k")) == {"k.values", "k.cols", "k.rows"}
    assert sparse.CSR.of(torch.zeros(3, 4)).nbytes() == sparse.csr_bytes(3, 4, 0) == 16


def test_saliency_weighs_entries_by_their_input_energy():
    delta = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    diag = torch.tensor([100.0, 1.0])  # column 0 carries 100 times the energy
    kept = sparse.salient(delta, diag, 2)
    assert torch.equal(kept, torch.tensor([[1.0, 0.0], [3.0, 0.0]]))


def test_godec_never_raises_the_stored_error():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(24, 64, generator=g), torch.randn(200, 64, generator=g) * torch.linspace(0.1, 3, 64)
    st = stats_of(x)
    for bits in (2, 3, 4):
        fit = lambda t: quantize(t, bits, 32, "int").dequantize()  # noqa: E731
        split = sparse.godec(w, st, 40, fit)
        assert split.error2 <= split.errors2[0]
        assert split.error2 == min(split.errors2)
        recomputed = error_norm2(w - split.approx - split.sparse.dense(), st)
        assert abs(recomputed - split.error2) <= 1e-9 * max(1.0, split.error2)
    assert sparse.godec(w, st, 0, lambda t: t * 0).sparse.nnz == 0


def test_low_rank_plus_spikes_is_recovered():
    g = torch.Generator().manual_seed(2)
    low = torch.randn(30, 3, generator=g) @ torch.randn(3, 40, generator=g)
    spikes = torch.zeros(30, 40)
    where = torch.randperm(1200, generator=g)[:12]
    # spikes up to the low-rank part's energy (where they hold most of it, the first rank-3 fit
    # bends toward them and hard thresholding can stall: 20 here finds 10 of 12)
    spikes.view(-1)[where] = 8 * torch.sign(torch.randn(12, generator=g))
    st = stats_of(torch.randn(500, 40, generator=g))

    def rank3(t: torch.Tensor) -> torch.Tensor:
        u, s, vt = torch.linalg.svd(t, full_matrices=False)
        return (u[:, :3] * s[:3]) @ vt[:3]

    split = sparse.godec(low + spikes, st, 12, rank3, iters=10)
    found = set(split.sparse.dense().reshape(-1).nonzero().reshape(-1).tolist())
    assert found == set(where.tolist())
    assert torch.linalg.matrix_rank(split.approx, atol=1e-3) == 3
    assert split.error2 < 1e-6 * split.errors2[0]


def test_the_eps_search_with_a_sparse_term_needs_a_lower_rank():
    """A rank-3 weight with a few large spikes: truncation alone needs a high rank for the
    spikes; with as many exact entries the search stops at rank 3, never worse, and the
    alternation on the chosen form never raises its error."""
    from svdq.algo.error import reference
    from svdq.algo.factorize import factorize
    from svdq.algo.search import choose, refined_sparse

    torch.manual_seed(0)
    w = torch.randn(48, 3) @ torch.randn(3, 64) / 8
    spikes = torch.randperm(w.numel())[:20]
    w.view(-1)[spikes] += 5 * torch.sign(torch.randn(20))
    stats = stats_of(torch.randn(512, 64))
    factors = factorize("svd", w, stats)
    plain = choose(w, None, factors, stats, 0.05, 16, 64)
    with_s = choose(w, None, factors, stats, 0.05, 16, 64, sparse=20)
    assert with_s.kind == "lowrank" and with_s.sparse.nnz == 20 and with_s.error <= 0.05
    assert with_s.rank == 3 and plain.rank > 10  # the spikes cost truncation a rank each
    ref = reference(w, None, stats)
    refined = refined_sparse(w, with_s, stats, ref, "svd")
    assert refined.error <= with_s.error and refined.rank == with_s.rank
    assert refined.sparse.nnz == 20
    w_hat = refined.dequantize()  # the form and its sparse term
    assert abs(error_norm2(w - w_hat, stats) ** 0.5 / ref - refined.error) < 1e-6
    # kept and 16-bit dense layers take no sparse term
    from svdq.algo.stored import keep
    assert sparse.with_sparse(w, keep(), stats, ref, 5).sparse is None


def test_best_entries_never_raise_the_error_of_a_compensating_error():
    """On correlated inputs a GPTQ-like error compensates between columns; the best entries,
    values solved through the Gram, still only lower ‖X (Δ − S)ᵀ‖²."""
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(32, 32, generator=g)
    x = torch.randn(400, 32, generator=g) @ (torch.eye(32) + 0.9 * mix / 32 ** 0.5)
    stats = stats_of(x)
    delta = torch.randn(16, 32, generator=g) @ torch.linalg.inv(stats.gram.float() + torch.eye(32))
    base = error_norm2(delta, stats)
    for k in (1, 5, 40, 200):
        s = sparse.best_entries(delta, stats.gram, k)
        assert int((s != 0).sum()) <= k
        assert error_norm2(delta - s, stats) <= base * (1 + 1e-9)
