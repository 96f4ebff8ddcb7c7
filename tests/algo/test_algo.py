"""Tests for svdq.algo: quantization against bitsandbytes, byte counts, factorization, rank search.

Errors are recomputed here on stored activations X (not through the Gram matrix), so the search
is checked against the definition in DESIGN.md, not against itself.
"""
from __future__ import annotations

import math

import pytest
import torch

from svdq.algo import error, lowrank, quant, search
from svdq.algo.factorize import LayerStats, factorize

bnbf = pytest.importorskip("bitsandbytes.functional")

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decaying_layer(out_f: int, in_f: int, decay: float, seed: int) -> torch.Tensor:
    """W = Q1 diag(decay^i) Q2ᵀ: known, geometrically decaying singular values."""
    g = _gen(seed)
    q1, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=F64))
    r = min(out_f, in_f)
    s = decay ** torch.arange(r, dtype=F64)
    return (q1[:, :r] * s) @ q2[:, :r].T


def inputs(tokens: int, in_f: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a non-zero mean (so the bias cross term matters)."""
    g = _gen(seed)
    z = torch.randn(tokens, in_f, generator=g, dtype=F64)
    a = torch.randn(in_f, in_f, generator=g, dtype=F64) / in_f ** 0.5
    return z @ a + 0.3


def stats_of(x: torch.Tensor) -> LayerStats:
    return LayerStats(x.T @ x, x.sum(0), x.shape[0])


def direct_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor,
                 bias: torch.Tensor | None) -> float:
    """‖X (W − Ŵ)ᵀ‖_F / ‖X Wᵀ + b‖_F on the activations themselves."""
    y = x @ w.double().T + (0 if bias is None else bias.double())
    return float((x @ (w.double() - w_hat.double()).T).norm() / y.norm())


def lowrank_hat(u: quant.Quantized, s: torch.Tensor, v: quant.Quantized) -> torch.Tensor:
    """The stored low-rank layer, computed as `choose` and the runtime compute it (float32)."""
    return (u.dequantize().T * s) @ v.dequantize()


def stored_bytes(q: quant.Quantized) -> int:
    return sum(t.numel() * t.element_size() for t in q.tensors("k").values())


def scan_errors(w, bias, factors, x, bits, block, k_max) -> list[float]:
    """Error of the stored layer at every rank 1..k_max (index 0 is rank 1)."""
    errs = []
    for k in range(1, k_max + 1):
        u = quant.quantize(factors.u[:, :k].T, bits, block)
        v = quant.quantize(factors.vt[:k], bits, block)
        errs.append(direct_error(x, w, lowrank_hat(u, factors.s[:k].float(), v), bias))
    return errs


# ----------------------------------------------------------------------------- quantization
SHAPES_8 = [(7,), (1, 1), (5, 13), (24, 40), (3, 100), (33, 65), (64, 64)]


@pytest.mark.parametrize("block", [64, 128, 256], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", SHAPES_8, ids=lambda s: "x".join(map(str, s)))
def test_8bit_dequantize_matches_bitsandbytes_bit_for_bit(shape, block):
    w = torch.randn(shape, generator=_gen(1)) * 3
    q = quant.quantize(w, 8, block)
    codes, state = bnbf.quantize_blockwise(w.contiguous(), blocksize=block)
    ref = bnbf.dequantize_blockwise(codes, state)
    ours = q.dequantize()
    assert ours.shape == w.shape and ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    assert q.data.dtype == torch.uint8 and q.data.numel() == w.numel()
    assert q.absmax.dtype == torch.float32 and q.absmax.numel() == math.ceil(w.numel() / block)
    assert float((ours - w).norm() / w.norm()) < 0.02  # and it is a quantization of w at all


# bnb 0.50's CPU dequantize_4bit is wrong on some shapes whose last dim is not a multiple of
# the block size (see test_nf4_shape_where_bitsandbytes_cpu_dequant_is_wrong); compare with it
# only where it is right.
@pytest.mark.parametrize("shape,block", [((3, 64), 64), ((8, 128), 64), ((2, 256), 64),
                                         ((4, 128), 128), ((5, 256), 256)],
                         ids=["3x64-B64", "8x128-B64", "2x256-B64", "4x128-B128", "5x256-B256"])
def test_nf4_dequantize_matches_bitsandbytes_bit_for_bit(shape, block):
    w = torch.randn(shape, generator=_gen(2))
    q = quant.quantize(w, 4, block)
    codes, state = bnbf.quantize_4bit(w.contiguous(), blocksize=block, quant_type="nf4")
    ref = bnbf.dequantize_4bit(codes, state)
    assert torch.equal(q.dequantize(), ref)


def nf4_reference(w: torch.Tensor, block: int) -> torch.Tensor:
    """Nearest NF4 code per element, scaled by its block's absmax: NF4 from its definition."""
    book = quant.codebook(4)
    flat = w.reshape(-1).float()
    pad = (-flat.numel()) % block
    blocks = torch.cat((flat, flat.new_zeros(pad))).view(-1, block)
    absmax = blocks.abs().amax(1, keepdim=True)
    idx = ((blocks / absmax).unsqueeze(-1) - book).abs().argmin(-1)
    return (book[idx] * absmax).reshape(-1)[: w.numel()].reshape(w.shape)


def test_codebooks_are_made_once_and_handed_out_as_copies():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    book = quant.codebook(4)
    book += 1  # the caller's own copy
    assert torch.equal(quant.codebook(4), bnbf.get_4bit_type("nf4", device="cpu").float())
    assert torch.equal(quant.codebook(8), bnbf.create_dynamic_map(signed=True).float())
    assert quant.codebook(8) is not quant.codebook(8)


@pytest.mark.parametrize("shape", [(4, 32), (2, 96), (5, 13), (24, 40), (3, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_nf4_dequantize_matches_nearest_code_definition(shape):
    w = torch.randn(shape, generator=_gen(3))
    ours = quant.quantize(w, 4, 64).dequantize()
    ref = nf4_reference(w, 64)
    # bitsandbytes' thresholds are midpoints of the codes; allow nothing but ties to differ
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)


def test_nf4_shape_where_bitsandbytes_cpu_dequant_is_wrong():
    # On (4, 32) with block 64, bnb 0.50's CPU dequantize_4bit gives ~0.32 relative error;
    # ours must give the ordinary NF4 error on Gaussian data (~0.09).
    w = torch.randn(4, 32, generator=_gen(4))
    ours = quant.quantize(w, 4, 64).dequantize()
    rel = float((ours - w).norm() / w.norm())
    assert 0.06 < rel < 0.12, rel


@pytest.mark.parametrize("bits", [4, 8, 16], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("shape", [(7,), (5, 13), (24, 40), (33, 65), (64, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_nbytes_equals_bytes_of_stored_tensors(shape, bits):
    w = torch.randn(shape, generator=_gen(5))
    q = quant.quantize(w, bits, 64)
    assert quant.nbytes(w.numel(), bits, 64) == stored_bytes(q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
def test_16bit_is_float16_round_trip(dtype):
    w = (torch.randn(5, 13, generator=_gen(6)) * 100).to(dtype)
    q = quant.quantize(w, 16, 64)
    assert q.absmax is None and q.data.dtype == torch.float16
    assert list(q.tensors("w")) == ["w"]
    assert torch.equal(q.dequantize(), w.to(torch.float16).float())
    assert quant.nbytes(w.numel(), 16, 64) == 2 * w.numel() == stored_bytes(q)


@pytest.mark.parametrize("bits", [2, 3, 32], ids=lambda b: f"{b}bit")
def test_unsupported_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(torch.randn(4, 64), bits, 64)


# ----------------------------------------------------------------------------- factorize
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (17, 17)], ids=lambda s: "x".join(map(str, s)))
def test_svd_reconstructs_at_full_rank(shape):
    w = torch.randn(shape, generator=_gen(7), dtype=F64)
    f = factorize("svd", w, stats_of(inputs(32, shape[1], 8)))
    assert f.max_rank == min(shape)
    torch.testing.assert_close((f.u * f.s) @ f.vt, w.float(), rtol=0, atol=1e-4)
    eye = torch.eye(f.max_rank)
    torch.testing.assert_close(f.u.T @ f.u, eye, rtol=0, atol=1e-5)
    assert torch.all(f.s[:-1] >= f.s[1:])


def test_unknown_method_names_the_known_ones():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"'nope'.*svd"):
        factorize("nope", w, stats_of(inputs(8, 6, 9)))


# ----------------------------------------------------------------------------- search
LAYERS = [(48, 64, 0.8), (64, 40, 0.75), (24, 96, 0.7)]
LAYER_IDS = ["48x64", "64x40", "24x96"]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("out_f,in_f,decay", LAYERS, ids=LAYER_IDS)
def test_gram_error_functions_equal_errors_on_activations(out_f, in_f, decay, bias):
    w = decaying_layer(out_f, in_f, decay, 10)
    b = torch.randn(out_f, generator=_gen(11), dtype=F64) if bias else None
    x = inputs(200, in_f, 12)
    st = stats_of(x)
    delta = torch.randn(out_f, in_f, generator=_gen(13), dtype=F64) * 0.01
    y = x @ w.T + (0 if b is None else b)
    assert error.output_norm2(w, b, st) == pytest.approx(float(y.norm() ** 2), rel=1e-9)
    assert error.error_norm2(delta, st) == pytest.approx(float((x @ delta.T).norm() ** 2), rel=1e-9)


@pytest.mark.parametrize("out_f,in_f,decay", LAYERS, ids=LAYER_IDS)
def test_error_forms_in_float32_products_stay_within_float32_rounding(out_f, in_f, decay):
    """`--fast`'s `products_in(float32)`: the same trace forms and corrected errors to ~1e-6,
    not the same bits; the Gram's float32 copy is made once and float64 comes back after."""
    w = decaying_layer(out_f, in_f, decay, 10)
    b = torch.randn(out_f, generator=_gen(11), dtype=F64)
    x = inputs(200, in_f, 12)
    delta = torch.randn(out_f, in_f, generator=_gen(13), dtype=F64) * 0.01
    us, vt = delta[:, :3] * 0.5, torch.randn(3, in_f, generator=_gen(14), dtype=F64) * 0.01
    exact, st = stats_of(x), stats_of(x)
    want = (error.output_norm2(w, b, exact), error.error_norm2(delta, exact),
            error.corrected_error2(delta, error.error_norm2(delta, exact), us, vt, exact))
    with error.products_in(torch.float32):
        got = (error.output_norm2(w, b, st), error.error_norm2(delta, st),
               error.corrected_error2(delta, error.error_norm2(delta, st), us, vt, st))
        assert st.cache[("gram", torch.float32)][1] is st.gram_as(torch.float32)
    assert got == pytest.approx(want, rel=2e-5) and got != want
    assert error.error_norm2(delta, st) == want[1]  # float64 again outside


def test_output_norm2_is_made_once_per_weight_and_bias_and_never_read_for_another():
    x = inputs(200, 64, 12)
    st = stats_of(x)
    w, b = decaying_layer(48, 64, 0.8, 10), torch.randn(48, generator=_gen(11), dtype=F64)
    first = error.output_norm2(w, b, st)
    st.gram = st.gram * 2  # a stale cache would not see this: only the cached objects are read
    assert error.output_norm2(w, b, st) == first
    assert error.output_norm2(w, None, st) == pytest.approx(float((x @ w.T).norm() ** 2) * 2,
                                                            rel=1e-9)
    for k in range(3):  # weights made and freed: a new one in an old one's memory is new
        other = decaying_layer(48, 64, 0.8, 20 + k)
        y = x @ other.T + b
        assert error.output_norm2(other, b, st) == pytest.approx(
            float(y.norm() ** 2) + float((x @ other.T).norm() ** 2), rel=1e-9)
        del other


@pytest.mark.parametrize("eps", [0.3, 0.1, 0.03, 0.005], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("out_f,in_f,decay", LAYERS, ids=LAYER_IDS)
def test_choose_16bit_returns_minimal_rank_of_linear_scan(out_f, in_f, decay, eps):
    w = decaying_layer(out_f, in_f, decay, 20)
    b = torch.randn(out_f, generator=_gen(21), dtype=F64) * 0.1
    x = inputs(256, in_f, 22)
    st = stats_of(x)
    f = factorize("svd", w, st)
    c = search.choose(w, b, f, st, eps, 16, 64)
    errs = scan_errors(w, b, f, x, 16, 64, c.k_break)
    passing = [k for k, e in enumerate(errs, 1) if e <= eps]
    assert passing, "eps out of reach of this layer: the test would not test the search"
    assert c.kind == "lowrank" and c.bits == 16
    assert c.rank == passing[0]
    assert c.error == pytest.approx(errs[c.rank - 1], rel=1e-9)


@pytest.mark.parametrize("eps", [0.3, 0.05, 0.02, 0.015], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("out_f,in_f,decay", LAYERS, ids=LAYER_IDS)
def test_choose_8bit_rank_meets_eps_and_one_less_does_not(out_f, in_f, decay, eps):
    w = decaying_layer(out_f, in_f, decay, 30)
    b = torch.randn(out_f, generator=_gen(31), dtype=F64) * 0.1
    x = inputs(256, in_f, 32)
    st = stats_of(x)
    f = factorize("svd", w, st)
    c = search.choose(w, b, f, st, eps, 8, 64)
    errs = scan_errors(w, b, f, x, 8, 64, c.k_break)
    assert errs[-1] <= eps, "eps out of reach at k_break: the test would not test the search"
    assert c.kind == "lowrank" and c.bits == 8 and 1 <= c.rank <= c.k_break
    assert errs[c.rank - 1] <= eps
    if c.rank > 1:
        assert errs[c.rank - 2] > eps
    # where the scan is monotone up to the answer, the answer is the scan's first passing rank
    first = next(k for k, e in enumerate(errs, 1) if e <= eps)
    if all(a > b for a, b in zip(errs[: c.rank - 1], errs[1: c.rank])):
        assert c.rank == first


@pytest.mark.parametrize("r", [1, 3, 5], ids=lambda r: f"rank{r}")
def test_exact_low_rank_matrix_compresses_to_its_rank(r):
    g = _gen(40 + r)
    w = torch.randn(48, r, generator=g, dtype=F64) @ torch.randn(r, 64, generator=g, dtype=F64)
    x = inputs(256, 64, 41)
    st = stats_of(x)
    c = search.choose(w, None, factorize("svd", w, st), st, 0.01, 16, 64)
    assert c.kind == "lowrank" and 1 <= c.rank <= r
    assert c.error <= 0.01
    assert direct_error(x, w, lowrank_hat(c.u, c.s, c.v), None) <= 0.01


@pytest.mark.parametrize("bits", [16, 8], ids=lambda b: f"{b}bit")
def test_gaussian_weights_fall_back_to_dense(bits):
    eps, block = 0.01, 64
    w = torch.randn(48, 64, generator=_gen(50), dtype=F64)
    x = inputs(256, 64, 51)
    st = stats_of(x)
    f = factorize("svd", w, st)
    c = search.choose(w, None, f, st, eps, bits, block)
    # why: even the largest rank worth storing misses eps by far
    assert scan_errors(w, None, f, x, bits, block, c.k_break)[-1] > 10 * eps
    assert c.kind == "dense" and c.rank == 0 and c.u is None and c.v is None
    dense_err = direct_error(x, w, quant.quantize(w, bits, block).dequantize(), None)
    if dense_err <= eps:
        assert c.bits == bits and c.weight is not None
        assert c.error == pytest.approx(dense_err, rel=1e-9)
    else:
        assert c.bits is None and c.weight is None
    if bits == 16:
        assert c.bits == 16  # float16 of a Gaussian matrix is far inside 0.01


def test_dense_quantized_error_above_eps_keeps_source_precision():
    eps, bits, block = 0.01, 4, 64
    w = decaying_layer(48, 64, 0.8, 60)
    x = inputs(256, 64, 61)
    st = stats_of(x)
    dense_err = direct_error(x, w, quant.quantize(w, bits, block).dequantize(), None)
    assert dense_err > eps  # the premise
    c = search.choose(w, None, factorize("svd", w, st), st, eps, bits, block)
    assert c.kind == "keep" and c.bits is None and c.weight is None and c.error == 0.0


@pytest.mark.parametrize("out_f,in_f,bits,block", [
    (48, 64, 16, 64), (48, 64, 8, 64), (48, 64, 4, 64), (768, 3072, 8, 64), (3072, 768, 4, 128),
    (7, 5, 8, 64), (1, 1, 16, 64), (2, 2, 8, 64), (13, 1000, 4, 64), (100, 100, 16, 256),
    # ties: some rank's bytes equal the dense bytes exactly (that rank must not count)
    (4, 18, 16, 64), (6, 6, 8, 64), (4, 16, 4, 64),
], ids=lambda v: str(v))
def test_break_even_rank_is_largest_rank_below_dense_bytes(out_f, in_f, bits, block):
    k = lowrank.break_even_rank(out_f, in_f, bits, block)
    dense = quant.nbytes(out_f * in_f, bits, block)
    assert 0 <= k <= min(out_f, in_f)
    if k > 0:
        assert lowrank.lowrank_bytes(out_f, in_f, k, bits, block) < dense
    if k < min(out_f, in_f):
        assert lowrank.lowrank_bytes(out_f, in_f, k + 1, bits, block) >= dense
    if min(out_f, in_f) <= 100:  # and no smaller-than-dense rank hides above it
        assert all(lowrank.lowrank_bytes(out_f, in_f, j, bits, block) >= dense
                   for j in range(k + 1, min(out_f, in_f) + 1))


@pytest.mark.parametrize("out_f,in_f,bits,tie", [(4, 18, 16, 3), (6, 6, 8, 2), (4, 16, 4, 2)],
                         ids=["4x18-16bit", "6x6-8bit", "4x16-4bit"])
def test_break_even_rank_excludes_a_rank_of_equal_bytes(out_f, in_f, bits, tie):
    dense = quant.nbytes(out_f * in_f, bits, 64)
    assert lowrank.lowrank_bytes(out_f, in_f, tie, bits, 64) == dense  # the premise
    assert lowrank.break_even_rank(out_f, in_f, bits, 64) == tie - 1


def test_break_even_rank_is_zero_when_no_rank_saves_bytes():
    assert lowrank.break_even_rank(1, 1, 16, 64) == 0
    assert lowrank.break_even_rank(2, 2, 8, 64) == 0


@pytest.mark.parametrize("bits,eps", [(16, 0.05), (8, 0.05), (4, 0.2), (16, 0.01), (8, 0.01)],
                         ids=["16bit-lowrank", "8bit-lowrank", "4bit-lowrank", "16bit-dense",
                              "8bit-dense"])
def test_choice_error_and_bytes_match_its_stored_tensors(bits, eps):
    block = 64
    w = decaying_layer(48, 64, 0.8 if eps > 0.01 else 0.97, 70)
    b = torch.randn(48, generator=_gen(71), dtype=F64) * 0.1
    x = inputs(256, 64, 72)
    st = stats_of(x)
    c = search.choose(w, b, factorize("svd", w, st), st, eps, bits, block)
    assert c.bits == bits  # these cases were picked to store something quantized
    if c.kind == "lowrank":
        w_hat = lowrank_hat(c.u, c.s, c.v)
        assert c.s.dtype == torch.float32
        stored = stored_bytes(c.u) + stored_bytes(c.v) + c.s.numel() * c.s.element_size()
        assert stored == lowrank.lowrank_bytes(48, 64, c.rank, bits, block)
        assert c.rank <= c.k_break
    else:
        assert eps == 0.01  # the dense cases are the 0.01 ones
        w_hat = c.weight.dequantize()
        assert stored_bytes(c.weight) == quant.nbytes(48 * 64, bits, block)
    assert c.kind == ("lowrank" if eps > 0.01 else "dense")
    assert c.error <= eps
    gram = error.error_norm2(w - w_hat, st) ** 0.5 / error.output_norm2(w, b, st) ** 0.5
    assert c.error == pytest.approx(gram, rel=1e-12)
    assert c.error == pytest.approx(direct_error(x, w, w_hat, b), rel=1e-9)
