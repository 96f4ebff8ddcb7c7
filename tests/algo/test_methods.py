"""Data-aware factorizations: each plugs into the same search, quantization and storage."""
from __future__ import annotations

import pytest
import torch

from svdq.algo.factorize import METHODS, LayerStats, factorize, gram_root
from svdq.algo.error import error_norm2, output_norm2
from svdq.algo.search import choose


@pytest.fixture(scope="module")
def layer():
    """A 24×40 layer whose inputs are strongly correlated and unevenly scaled."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(40, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 40, dtype=torch.float64)
    x = torch.randn(600, 40, generator=g, dtype=torch.float64) @ mix.T + 0.3
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    b = torch.randn(24, generator=g, dtype=torch.float64)
    row_fisher = torch.rand(24, generator=g, dtype=torch.float64) + 0.1  # for `fisher`
    return w, b, x, LayerStats(x.T @ x, x.sum(0), x.shape[0], x.abs().sum(0), row_fisher=row_fisher)


def unquantized_error(w, b, stats, factors, k):
    w_hat = (factors.u[:, :k] * factors.s[:k]) @ factors.vt[:k]
    return (error_norm2(w - w_hat.double(), stats) / output_norm2(w, b, stats)) ** 0.5


@pytest.mark.parametrize("k", [2, 5, 10, 20])
def test_whitening_beats_plain_svd_at_every_rank(layer, k):
    """Whitened truncation is optimal for the calibration error, so never worse."""
    w, b, _, stats = layer
    plain = unquantized_error(w, b, stats, factorize("svd", w.float(), stats), k)
    assert unquantized_error(w, b, stats, factorize("whiten", w.float(), stats), k) <= plain * (1 + 1e-6)


def test_asvd_beats_plain_svd_on_average_over_ranks():
    """ASVD is a heuristic, a diagonal stand-in for whitening: it pays where a few input
    channels carry much larger activations than the rest (as in LLMs), over the whole error
    curve though not necessarily at every single rank."""
    g = torch.Generator().manual_seed(3)
    channel_scale = torch.ones(40, dtype=torch.float64)
    channel_scale[torch.randperm(40, generator=g)[:4]] = 20.0  # a few outlier channels
    x = torch.randn(600, 40, generator=g, dtype=torch.float64) * channel_scale
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    b = torch.zeros(24, dtype=torch.float64)
    stats = LayerStats(x.T @ x, x.sum(0), x.shape[0], x.abs().sum(0))
    curves = {m: [unquantized_error(w, b, stats, factorize(m, w.float(), stats), k)
                  for k in range(1, 24)] for m in ("svd", "asvd")}
    assert sum(curves["asvd"]) < 0.8 * sum(curves["svd"])


@pytest.mark.parametrize("k", [1, 4, 12, 23])
def test_whitened_error_is_the_tail_of_its_singular_values(layer, k):
    w, b, x, stats = layer
    f = factorize("whiten", w.float(), stats)
    direct = torch.linalg.norm(x @ (w - (f.u[:, :k].double() * f.s[:k].double()) @ f.vt[:k].double()).T)
    tail = f.s[k:].double().pow(2).sum().sqrt()
    assert float(direct) == pytest.approx(float(tail), rel=1e-3)  # float32 factors, damped root


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_reconstructs_at_full_rank(layer, method):
    w, _, _, stats = layer
    f = factorize(method, w.float(), stats)
    assert torch.allclose((f.u * f.s) @ f.vt, w.float(), atol=1e-3)


BRANCHES = pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])


def shaped(layer, shape):
    """The fixture's layer cut or stacked to `shape` (wide: whitening's root-free branch; tall:
    its root), with statistics of that many inputs and a row Fisher for `fisher`."""
    w, _, _, stats = layer
    w = w[:, :shape[1]] if shape[0] <= shape[1] else torch.cat([w, w[:16] * 0.5])[:, :shape[1]]
    return w, LayerStats(stats.gram[:shape[1], :shape[1]], stats.total[:shape[1]], stats.tokens,
                         stats.abs_total[:shape[1]],
                         row_fisher=torch.rand(shape[0], generator=torch.Generator().manual_seed(1),
                                               dtype=torch.float64) + 0.1)


@pytest.mark.parametrize("method", sorted(METHODS))
@BRANCHES
def test_factors_made_in_float32_are_float64s_to_float32_precision(layer, method, shape):
    """`--fast` decomposes its bases' errors in float32: each rank's calibration error is the
    float64 factors' within 1e-3 of the whole error, on both of whitening's branches."""
    w, stats = shaped(layer, shape)
    f64 = factorize(method, w.float(), stats)
    f32 = factorize(method, w.float(), stats, torch.float32)
    assert f32.u.dtype == f32.s.dtype == f32.vt.dtype == torch.float32
    whole = unquantized_error(w, None, stats, f64, 0)
    for k in (1, 3, 8, min(shape) - 1):
        assert unquantized_error(w, None, stats, f32, k) == pytest.approx(
            unquantized_error(w, None, stats, f64, k), abs=1e-3 * whole)


@pytest.mark.parametrize("method", sorted(METHODS))
@BRANCHES
def test_factors_made_only_to_a_rank_are_the_whole_factors_first_columns(layer, method, shape):
    """A refinement that knows its rank asks for only those triples: the same numbers as the
    whole factorization's first ones (and its energy), on both of whitening's branches."""
    w, stats = shaped(layer, shape)
    for dtype in (torch.float64, torch.float32):
        whole = factorize(method, w.float(), stats, dtype)
        top = factorize(method, w.float(), stats, dtype, rank=7)
        assert (top.u.shape, top.s.shape, top.vt.shape) == ((shape[0], 7), (7,), (7, shape[1]))
        for part, full in ((top.u, whole.u[:, :7]), (top.s, whole.s[:7]), (top.vt, whole.vt[:7])):
            assert torch.allclose(part, full, rtol=1e-5, atol=1e-6)
            # its own storage: no view keeps (or `Kept` saves) the whole factorization
            assert part.untyped_storage().nbytes() == part.numel() * part.element_size()
        assert top.energy == whole.energy


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@BRANCHES
def test_whitened_factors_carry_the_weights_exact_energy(layer, shape, dtype, rel):
    """`Factors.energy` (a quantized base's error, taken from it instead of a trace form) is
    tr(W G Wᵀ) on both of whitening's branches, the tall one's root damping taken out."""
    w, stats = shaped(layer, shape)
    f = factorize("whiten", w.float(), stats, dtype)
    assert f.energy == pytest.approx(error_norm2(w.float().double(), stats), rel=rel)
    assert factorize("svd", w.float(), stats).energy is None  # nothing for free there


def test_whitening_survives_a_singular_gram():
    """Rank-deficient inputs (a dead channel, duplicated channels): Cholesky needs damping."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:, :3], torch.zeros(200, 1, dtype=torch.float64)], dim=1)  # 12 channels
    stats = LayerStats(x.T @ x, x.sum(0), 200, x.abs().sum(0))
    root, inverse = gram_root(stats.gram)
    assert inverse is None and torch.equal(root, root.tril())  # Cholesky, after damping
    assert torch.isfinite(root).all() and torch.allclose(root @ root.T, stats.gram, atol=1e-3)
    assert torch.linalg.matrix_rank(root) == 12  # damped: invertible, though the Gram is not
    w = torch.randn(6, 12, generator=g)
    f = factorize("whiten", w, stats)
    assert torch.isfinite(f.vt).all()
    assert unquantized_error(w.double(), None, stats, f, 6) < 1e-4


def test_gram_root_falls_back_to_eigh_when_cholesky_fails(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 5, generator=g, dtype=torch.float64)
    gram = x.T @ x
    failing = lambda a: (a, torch.tensor(1))  # noqa: E731 - every Cholesky reports failure
    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    root, inverse = gram_root(gram)
    assert torch.allclose(root @ root.T, gram, rtol=1e-6, atol=1e-6)
    assert torch.allclose(root @ inverse, torch.eye(5, dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("bits", [8, 16])
def test_whitened_search_needs_no_more_rank_than_plain(layer, bits):
    w, b, _, stats = layer
    ranks = {m: choose(w.float(), b.float(), factorize(m, w.float(), stats), stats, 0.2, bits, 64)
             for m in ("svd", "whiten")}
    assert ranks["whiten"].error <= 0.2
    if ranks["svd"].kind == "lowrank":
        assert ranks["whiten"].kind == "lowrank" and ranks["whiten"].rank <= ranks["svd"].rank


def test_asvd_needs_abs_statistics(layer):
    w, _, x, stats = layer
    with pytest.raises(ValueError, match="mean \\|x\\|"):
        factorize("asvd", w.float(), LayerStats(stats.gram, stats.total, stats.tokens))


@pytest.mark.parametrize("fails", [1, 2])
def test_an_eigendecomposition_lapack_gives_up_on_is_made_another_way(layer, monkeypatch, fails):
    """Where LAPACK's eigh fails (PyTorch issue 145801), the shifted matrix's (one failure) or
    the SVD's (two) give the same eigenvalues and an eigenbasis of the same matrix, and the
    whitened factorization built on them is the same."""
    from svdq.algo import spectral

    w, b, _, stats = layer
    m = (w @ stats.gram.double() @ w.T)
    want_values, _ = torch.linalg.eigh(m)
    want = factorize("whiten", w, stats)
    real, calls = torch.linalg.eigh, []

    def flaky(a):
        calls.append(1)
        if len(calls) % 3 <= fails and len(calls) % 3 != 0:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(a)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    values, vectors = spectral.eigh(m)
    torch.testing.assert_close(values, want_values, rtol=1e-9, atol=1e-9 * float(values[-1]))
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, m,
                               rtol=1e-9, atol=1e-9 * float(values[-1]))
    calls.clear()
    got = factorize("whiten", w, stats)
    assert calls  # the factorization went through the flaky eigh
    torch.testing.assert_close(got.s, want.s, rtol=1e-5, atol=1e-6)
    k = 10
    torch.testing.assert_close(unquantized_error(w, b, stats, got, k),
                               unquantized_error(w, b, stats, want, k), rtol=1e-4, atol=1e-7)
