"""A budget's option table (svdq/pipeline/options.py): the rank grid; each option's error and
bytes as `search.choose` and the quantizer give them; `stored_of` rebuilds an option; with
`--sparse`, sparse variants of a base and its corrections share one refit of the base, so
their cost does not grow with the ranks that get a variant."""
from __future__ import annotations

import pytest
import torch

from svdq.algo import error, lowrank, quant, search
from svdq.algo.allocate import Option
from svdq.algo.factorize import LayerStats, factorize
from svdq.config import Settings
from svdq.models import load as hf
from svdq.pipeline import measured, options
from svdq.pipeline.inputs import calibration_ids
from svdq.pipeline.analyse import analyse
from svdq.pipeline.options import layer_options, rank_grid, stored_of
from svdq.pipeline.work import Clock

F64 = torch.float64


def test_sparse_variants_refit_each_base_once(models, calib_file, monkeypatch):
    source = hf.load_source(str(models["llama"]))
    settings = Settings(budget_ratio=0.3, sparse=0.01, calib=str(calib_file), calib_samples=4,
                        calib_len=32, batch_size=4)
    ids = calibration_ids(source, settings, lambda *a: None, {})
    work = analyse(source, settings, ids, lambda *a: None, Clock(), gradients=True)[0]
    calls: list[tuple] = []
    real = options.residual_of

    def counted(w, stats, bits, block, *rest, **kw):
        calls.append((bits, block, *rest[1:2]))
        return real(w, stats, bits, block, *rest, **kw)
    monkeypatch.setattr(measured, "residual_of", counted)  # the bases
    monkeypatch.setattr(options, "residual_of", counted)  # their refits to W − S
    opts = measured.measure_layer(work, settings).options
    bases = options.bases(settings)
    sparse = [o for o in opts if o.sparse]
    assert any(o.kind == "residual" for o in sparse) and any(o.kind == "dense" for o in sparse)
    assert len(calls) == 2 * len(bases)  # the base itself, and its one refit to W − S
    assert sorted(set(calls)) == sorted({(b, k, g) for b, k, g in bases})
    for o in sparse:  # a variant is offered only where the term lowers the form's error
        twin = next(x for x in opts if not x.sparse and (x.kind, x.rank, x.bits, x.block, x.grid)
                    == (o.kind, o.rank, o.bits, o.block, o.grid))
        assert o.error < twin.error and o.bytes > twin.bytes


def test_rank_grid():
    assert rank_grid(0) == [] and rank_grid(1) == [1] and rank_grid(3) == [1, 2, 3]
    assert rank_grid(12) == list(range(1, 13))
    for k in (13, 20, 64, 300, 2304):
        grid = rank_grid(k)
        assert grid[0] == 1 and grid[-1] == k and grid == sorted(set(grid))
        assert 8 <= len(grid) <= 12
        assert all(b / a <= k ** (1 / 11) + 1 for a, b in zip(grid, grid[1:]))  # no wide gaps


# ----------------------------------------------------------------------------- layer options
def small_layer(bias: bool):
    g = torch.Generator().manual_seed(7)
    q1, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=F64))
    w = ((q1[:, :48] * 0.85 ** torch.arange(48, dtype=F64)) @ q2[:, :48].T).float()
    b = torch.randn(48, generator=g) * 0.1 if bias else None
    x = torch.randn(256, 64, generator=g, dtype=F64) + 0.3
    st = LayerStats(x.T @ x, x.sum(0), x.shape[0])
    return w, b, st, factorize("svd", w, st)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_options_errors_equal_choose_and_quantize(bias):
    w, b, st, f = small_layer(bias)
    bias_bytes = 0 if b is None else 4 * b.numel()
    ref = error.output_norm2(w, b, st) ** 0.5
    for bits, eps_list in ((4, (0.3, 0.15)), (8, (0.3, 0.1, 0.03)), (16, (0.3, 0.1, 0.03))):
        for eps in eps_list:
            c = search.choose(w, b, f, st, eps, bits, 64)
            assert c.kind == "lowrank"  # the premise: a rank to compare at
            opts = layer_options(w, b, f, st, (bits,), 64, ranks=[c.rank], elsize=4)
            low = [o for o in opts if o.kind == "lowrank"]
            assert len(low) == 1 and low[0].rank == c.rank and low[0].bits == bits
            assert low[0].error == c.error
            assert low[0].bytes == lowrank.lowrank_bytes(48, 64, c.rank, bits, 64) + bias_bytes
        dense = [o for o in opts if o.kind == "dense" and o.bits == bits]
        q = quant.quantize(w, bits, 64)
        assert dense[0].error == error.error_norm2(w - q.dequantize(), st) ** 0.5 / ref
        assert dense[0].bytes == quant.nbytes(w.numel(), bits, 64) + bias_bytes
    kept = [o for o in opts if o.bits is None]
    assert kept == [Option(4 * w.numel() + bias_bytes, 0.0, "keep", 0, None)]


def test_layer_options_cover_each_bits_up_to_its_break_even_rank():
    w, b, st, f = small_layer(True)
    opts = layer_options(w, b, f, st, (8, 4, 8), 64)
    assert sum(o.bits is None for o in opts) == 1
    for bits in (4, 8):
        ranks = [o.rank for o in opts if o.kind == "lowrank" and o.bits == bits]
        assert ranks == rank_grid(lowrank.break_even_rank(48, 64, bits, 64))
    assert not any(o.bits == 16 for o in opts)


def test_stored_of_rebuilds_the_option():
    w, b, st, f = small_layer(True)
    for o in layer_options(w, b, f, st, (4, 8), 64, ranks=[3, 17], elsize=4):
        c = stored_of(o, w, b, f, st, 64, k_break=9)
        assert (c.kind, c.rank, c.bits, c.error) == (o.kind, o.rank, o.bits, o.error)
        stored = [] if o.bits is None else [c.u, c.v] if c.kind == "lowrank" else [c.weight]
        nbytes = sum(t.numel() * t.element_size() for q in stored for t in q.tensors("k").values())
        nbytes += 0 if c.s is None else 4 * c.s.numel()
        assert nbytes + 4 * b.numel() == o.bytes or o.bits is None
