"""GPTQ (svdq/algo/gptq.py) and the uniform integer grid (svdq/algo/quant.py).

GPTQ is checked against a straightforward reference written here — the column-by-column
OBQ update with the inverse Hessian of the columns not yet quantized, in float64 — and
against rounding on the same grid, on a layer whose inputs are correlated (where error
feedback has something to exploit)."""
from __future__ import annotations

import itertools

import pytest
import torch

from svdq import runtime
from svdq.algo import error, quant
from svdq.algo.factorize import LayerStats
from svdq.algo.gptq import gptq, gptq_many

F64 = torch.float64


def correlated(out_f: int, in_f: int, tokens: int = 1024, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, in_f, generator=g, dtype=F64)
    mix = torch.randn(in_f, in_f, generator=g, dtype=F64) / in_f ** 0.5
    x = z @ mix + 0.2 * torch.randn(in_f, generator=g, dtype=F64)
    x[:, 3] = 0  # a dead input column: no energy
    return torch.randn(out_f, in_f, generator=g), LayerStats(x.T @ x, x.sum(0), tokens)


def reference_gptq(w, gram, scales, zeros, bits, group, order, damp=0.01):
    """OBQ, one column at a time in `order`: round it, spread its error over the columns not
    yet done through the inverse Hessian of those columns, then drop it from that inverse."""
    h = gram.clone()
    w = w.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=F64)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros(w.shape, dtype=torch.long)
    left = list(order)
    for j in order:
        left.remove(j)
        s, z = scales[:, j // group].double(), zeros[:, j // group].double()
        code = torch.clamp(torch.round(w[:, j] / s) + z, 0, (1 << bits) - 1)
        codes[:, j] = code.long()
        err = (w[:, j] - (code - z) * s) / hinv[j, j]
        w[:, left] -= err[:, None] * hinv[j, left][None, :]
        hinv = hinv - hinv[:, j: j + 1] @ hinv[j: j + 1, :] / hinv[j, j]
    return codes


@pytest.mark.parametrize("lazy", [7, 40])  # 40: batches of gptq.INNER-column sub-batches
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_the_column_by_column_reference(act_order, lazy):
    w, st = correlated(5, 40)
    scales, zeros = quant.int_params(w, 4, 16, None, shrinks=1)  # min-max, as the reference
    order = (torch.argsort(st.gram.diagonal() + (st.gram.diagonal() == 0).double(),
                           descending=True, stable=True).tolist() if act_order else range(40))
    want = reference_gptq(w, st.gram, scales, zeros, 4, 16, list(order))
    got = gptq(w, st.gram, 4, 16, "int", act_order=act_order, search=False, dtype=F64,
               lazy=lazy)
    codes = runtime.unpack(got.codes, 5 * 40, 4).view(5, 40)
    assert torch.equal(got.scales, scales) and torch.equal(codes, want)


@pytest.mark.parametrize("grid,bits,block", [("int", 2, 32), ("int", 3, 64), ("int", 4, 64),
                                             ("int", 4, 48), ("int", 8, 128), ("bnb", 4, 64),
                                             ("bnb", 8, 64), ("bnb", 4, 256)])
def test_gptq_beats_rounding_on_the_same_grid(grid, bits, block):
    w, st = correlated(64, 192)
    ref = error.reference(w, None, st)
    rtn = quant.quantize(w, bits, block, grid)
    got = gptq(w, st.gram, bits, block, grid)
    e_rtn = error.relative_error(w, rtn.dequantize(), st, ref)
    e_gptq = error.relative_error(w, got.dequantize(), st, ref)
    assert e_gptq < 0.95 * e_rtn, (e_gptq, e_rtn)
    assert type(got) is type(rtn) and got.shape == rtn.shape and got.block_size == block
    assert sum(t.numel() * t.element_size() for t in got.tensors("k").values()) == \
        quant.weight_bytes(64, 192, bits, block, grid)
    assert bool((got.dequantize()[:, 3] == 0).all())  # the dead column stores zeros


def test_packed_codes_keep_the_little_endian_bit_stream_layout():
    """The artifact format: value i at bits [3i, 3i + 3) of the byte stream, low bits first."""
    assert quant.pack(torch.tensor([1, 2, 3]), 3).tolist() == [1 | 2 << 3 | (3 & 3) << 6, 3 >> 2]
    assert quant.pack(torch.tensor([0xA, 0x5, 0xF]), 4).tolist() == [0x5A, 0x0F]
    stream = torch.tensor([0b10111001, 0b1], dtype=torch.uint8)
    assert runtime.unpack(stream, 3, 3).tolist() == [1, 7, 6]


@pytest.mark.parametrize("bits,group,shape", list(itertools.product(
    (2, 3, 4, 8), (32, 64, 128), ((7, 100), (48, 576), (1, 33)))))
def test_integer_grid_round_trips_and_counts_bytes(bits, group, shape):
    g = torch.Generator().manual_seed(bits * group)
    values = torch.randint(0, 1 << bits, (1001,), generator=g)
    assert torch.equal(runtime.unpack(quant.pack(values, bits), 1001, bits), values)
    w = torch.randn(*shape, generator=g)
    q = quant.quantize(w, bits, group, "int")
    stored = q.tensors("k")
    codes, scales, zeros = (runtime.int_bytes(*shape, bits, group))
    assert [stored["k" + s].numel() * stored["k" + s].element_size()
            for s in (runtime.CODES, runtime.SCALES, runtime.ZEROS)] == [codes, scales, zeros]
    assert stored["k" + runtime.SCALES].dtype == torch.float16
    # every value is (code - zero) * scale of its group, and most within half a step of w
    # (a range shrunk to lower the error clips the few largest entries)
    deq = q.dequantize()
    col = torch.arange(shape[1]) // group
    groups = -(-shape[1] // group)
    codes = runtime.unpack(q.codes, w.numel(), bits).view(shape).float()
    zero = runtime.unpack(q.zeros, shape[0] * groups, bits).view(shape[0], groups).float()
    step = q.scales.float()[:, col]
    assert torch.equal(deq, (codes - zero[:, col]) * step)
    assert ((deq - w).abs() <= step * 0.5 + 1e-6).float().mean() > 0.9


def test_bits_per_weight_match_what_gptq_formats_count():
    # 4-bit codes, a float16 scale and a 4-bit zero per 64 weights: 4.3125 bits per weight
    assert quant.weight_bytes(576, 576, 4, 64, "int") * 8 / 576 ** 2 == 4.3125
    assert quant.weight_bytes(576, 576, 3, 64, "int") * 8 / 576 ** 2 == pytest.approx(3.296875)
    # a group size that does not divide the row: the last group of each row is shorter
    assert runtime.int_bytes(576, 576, 4, 128)[1] == 2 * 576 * 5


def test_a_gptq_base_at_rank_0_is_plain_gptq_and_refining_never_hurts():
    from svdq.algo.dense import quantize_weight, stored_dense
    from svdq.algo.residual import refine_residual, residual_of, stored_residual

    w, st = correlated(48, 128)
    ref = error.reference(w, None, st)
    res = residual_of(w, st, 3, 64, "whiten", "int", gptq=True)
    plain = quantize_weight(w, st, 3, 64, "int", gptq=True)
    assert torch.equal(res.weight.dequantize(), plain.dequantize())
    rank0 = stored_residual(w, res, st, ref, 0, 0)
    assert rank0.kind == "dense" and rank0.error == pytest.approx(  # its energy from the SVD
        stored_dense(w, st, ref, 3, 64, 0, "int", True).error, rel=1e-12)
    for k in (2, 8, 24):
        first = stored_residual(w, res, st, ref, k, 32)
        refined = refine_residual(w, first, st, ref, "whiten", gptq=True)
        assert refined.error <= first.error and refined.weight.grid == "int"
        assert refined.error < rank0.error  # a correction lowers the error of the base


@pytest.mark.parametrize("bits", runtime.INT_BITS)
def test_dequantize_int_is_code_minus_zero_times_scale_per_column(bits):
    """The byte-wise (2, 4, 8 bits) and 24-bit-word (3 bits) readers and the per-group
    broadcasting give exactly (code − zero) · scale of each column's group: partial last
    groups, rows narrower than a group, and bands of rows that do not divide the layer."""
    gen = torch.Generator().manual_seed(bits)
    for out_f, in_f, group in [(13, 32, 64), (9, 100, 32), (17, 130, 64), (3, 7, 4), (40000, 30, 32)]:
        groups = -(-in_f // group)
        q = torch.randint(0, 1 << bits, (out_f * in_f,), generator=gen)
        z = torch.randint(0, 1 << bits, (out_f * groups,), generator=gen)
        s = torch.rand(out_f, groups, generator=gen).half()
        col = torch.arange(in_f) // group
        expected = (q.view(out_f, in_f).float() - z.view(out_f, groups).float()[:, col]) * s.float()[:, col]
        got = runtime.dequantize_int(quant.pack(q, bits), s, quant.pack(z, bits), (out_f, in_f),
                                     group, bits)
        assert torch.equal(got, expected), (out_f, in_f, group)
        assert torch.equal(runtime.unpack(quant.pack(q, bits), q.numel(), bits), q)


def test_an_all_zero_group_comes_back_zero_on_the_integer_grid():
    """A group of zeros (an embedding's padding row, a pruned block) once rounded its float16
    scale to 0 and came back NaN; its codes are now the zero point, exactly 0 again."""
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(0))
    w[1], w[2, :64] = 0, 0
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    for bits in (2, 3, 4, 8):
        rounded, fed_back = quant.quantize(w, bits, 64, grid="int"), gptq(w, x.T @ x, bits, 64)
        for d in (rounded.dequantize(), fed_back.dequantize()):
            assert torch.isfinite(d).all() and not d[1].any(), bits
            assert (d[3] - w[3]).norm() < 0.6 * w[3].norm()
        # GPTQ may move the rest of its row's error into a zero group; rounding keeps it 0
        assert not rounded.dequantize()[2, :64].any()


def test_gptq_many_equals_each_grid_alone_and_prequantize_hands_them_out(monkeypatch):
    """Several grids in one column loop give bit for bit the codes of one run per grid, in the
    order asked; `prequantize` keeps them for `quantize_weight` of that very weight only, and
    splits the grids into loops under its `STACK` limit without changing a code."""
    from svdq.algo import dense

    w, st = correlated(48, 192)
    grids = [(4, 64, "int", False), (4, 256, "bnb", False), (3, 32, "int", True),
             (8, 64, "bnb", False), (2, 64, "int", True), (4, 64, "bnb", False)]
    alone = [gptq(w, st.gram, b, k, g, search=s) for b, k, g, s in grids]
    together = gptq_many(w, st.gram, grids)
    for a, t in zip(alone, together):
        assert type(a) is type(t) and (a.bits, a.block_size) == (t.bits, t.block_size)
        assert all(torch.equal(x, y) for x, y in zip(a.tensors("k").values(),
                                                     t.tensors("k").values()))
    others = [w * (1 + 0.1 * i) for i in range(len(grids))]  # a weight per grid
    for o, g, t in zip(others, grids, gptq_many(others, st.gram, grids)):
        a = gptq(o, st.gram, g[0], g[1], g[2], search=g[3])
        assert all(torch.equal(x, y) for x, y in zip(a.tensors("k").values(),
                                                     t.tensors("k").values()))
    monkeypatch.setattr(dense, "STACK", 2 * w.numel())  # two grids a loop: three loops
    dense.prequantize(w, st, [g[:3] for g in grids], gptq=True)
    held = dense.held(w, st)
    for (b, k, g, _), a in zip(grids, alone):
        got = dense.quantize_weight(w, st, b, k, g, gptq=True)
        assert got is held[(b, k, g)] and torch.equal(got.dequantize(), a.dequantize())
    other = w.clone()  # equal values, another tensor: quantized afresh, not handed out
    assert dense.quantize_weight(other, st, 4, 64, "int", gptq=True) is not held[(4, 64, "int")]
    assert dense.release(w, st) is held and dense.held(w, st) is None


def test_layers_fed_the_same_inputs_share_one_column_loop_with_the_codes_of_each_alone(
        monkeypatch):
    """q, k and v (rows of different counts, one Gram) quantized in one loop on every grid:
    each layer's codes are those it gets alone, and each is handed out for its own weight."""
    from svdq.algo import dense

    w, st = correlated(48, 192)
    k_w, v_w = w[:16] * 0.5 + 0.01, w[16:40].flip(0)  # 16 and 24 rows
    grids = [(4, 64, "int"), (4, 256, "bnb"), (3, 32, "int"), (8, 64, "bnb")]
    loops = []
    monkeypatch.setattr(dense, "gptq_many", lambda ws, *a, **k: loops.append(len(ws)) or
                        gptq_many(ws, *a, **k))
    dense.prequantize([w, k_w, v_w], st, grids, gptq=True)
    assert loops == [12]
    for x in (w, k_w, v_w):
        for b, k, g in grids:
            a = gptq(x, st.gram, b, k, g, search=b < 4)
            got = dense.quantize_weight(x, st, b, k, g, gptq=True)
            assert got is dense.held(x, st)[(b, k, g)] and got.shape == tuple(x.shape)
            assert all(torch.equal(p, q) for p, q in zip(a.tensors("k").values(),
                                                         got.tensors("k").values())), (x.shape, g)
