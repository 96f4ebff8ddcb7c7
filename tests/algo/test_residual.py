"""The residual form: the weight quantized at --bits plus a low-rank correction of what the
quantization lost; its search, its bytes, its place in the budget, and its artifacts."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

import svdq
from svdq import artifact
from svdq.algo import dense, error, lowrank, quant, residual, search
from svdq.algo.factorize import LayerStats, factorize
from svdq.cli import app
from svdq.config import Settings
from svdq.models import load as hf
from svdq.pipeline import budget, measured
from svdq.pipeline.compress import compress
from svdq.pipeline.options import layer_options, rank_grid, stored_of

from conftest import make_text

F64 = torch.float64
CALIB = dict(calib_samples=4, calib_len=32, batch_size=4)
FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def assert_loads_as_compressed(source, result, folder) -> None:
    """The artifact loads, through svdq and through its own copied svdq_loader.py, as the
    model `compress` left in memory."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("copied_loader", folder / "svdq_loader.py")
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    ids = torch.tensor([source.tokenizer(make_text(24, 5), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        for load in (svdq.load, copied.load):
            assert torch.allclose(load(folder)(input_ids=ids).logits, expected, atol=1e-5)


@pytest.fixture(scope="module")
def layer():
    """A 48×96 layer with heavy-tailed weights and correlated, unevenly scaled inputs."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 96, generator=g) * torch.rand(48, 96, generator=g) ** 3)
    mix = torch.randn(96, 96, generator=g, dtype=F64) * torch.logspace(0, -1.5, 96, dtype=F64)
    x = torch.randn(500, 96, generator=g, dtype=F64) @ mix.T
    b = torch.randn(48, generator=g) * 0.1
    return w, b, LayerStats(x.T @ x, x.sum(0), x.shape[0], x.abs().sum(0))


@pytest.mark.parametrize("bits", [4, 8])
def test_rank_0_is_plain_quantization(layer, bits):
    w, b, st = layer
    ref = error.reference(w, b, st)
    res = residual.residual_of(w, st, bits, 64, "whiten")
    zero = residual.stored_residual(w, res, st, ref, 0, k_break=5)
    plain = dense.stored_dense(w, st, ref, bits, 64, k_break=5)
    assert (zero.kind, zero.rank, zero.bits) == ("dense", 0, bits)
    assert torch.equal(zero.weight.data, plain.weight.data)
    assert torch.equal(zero.weight.absmax, plain.weight.absmax)
    assert zero.error == plain.error
    # an eps the quantized weight meets already: no correction is bought
    c = search.choose_residual(w, b, res, st, plain.error * 1.01)
    assert (c.kind, c.rank, c.bits) == ("dense", 0, bits)


@pytest.mark.parametrize("method", ["svd", "whiten"])
def test_correction_lowers_the_error_of_quantization(layer, method):
    w, b, st = layer
    ref = error.reference(w, b, st)
    res = residual.residual_of(w, st, 4, 64, method)
    errors = [residual.stored_residual(w, res, st, ref, k, 40).error for k in (0, 2, 8, 32)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]


def test_a_corrections_error_from_the_bases_equals_the_trace_form_of_the_stored_layer(layer):
    """`stored_residual`'s error comes from the base's error and the factors alone
    (`error.corrected_error2`); it is the error of the weight the layer stores, for the
    target it is asked about, also when one base is asked about two targets."""
    w, b, st = layer
    ref = error.reference(w, b, st)
    res = residual.residual_of(w, st, 4, 64, "whiten")
    other = w * 0.9  # a second target on the same base (as a sparse variant asks)
    for target in (w, other, w):
        for k in (1, 7, 30):
            got = residual.stored_residual(target, res, st, ref, k, 40)
            w_hat = got.weight.dequantize() + (got.u.dequantize().T * got.s) @ got.v.dequantize()
            assert got.error == pytest.approx(error.relative_error(target, w_hat, st, ref),
                                              rel=1e-6)  # w_hat in float32 here
        zero = residual.stored_residual(target, res, st, ref, 0, 40)
        assert zero.error == pytest.approx(
            error.relative_error(target, res.weight.dequantize(), st, ref), rel=1e-12)


def test_whitened_correction_before_factor_quantization_is_the_tail(layer):
    """Whitening makes the correction optimal for the calibration error: without quantizing
    the factors, the error at rank k is the tail of the singular values of (W − Q(W)) S."""
    w, b, st = layer
    res = residual.residual_of(w, st, 4, 64, "whiten")
    e = w.double() - res.weight.dequantize().double()
    for k in (1, 6, 20):
        f = res.factors
        left = e - (f.u[:, :k].double() * f.s[:k].double()) @ f.vt[:k].double()
        assert error.error_norm2(left, st) ** 0.5 == pytest.approx(
            float(f.s[k:].double().pow(2).sum().sqrt()), rel=1e-3)
    # and the whitened correction beats the plain one at every rank, factors quantized too
    plain = residual.residual_of(w, st, 4, 64, "svd")
    ref = error.reference(w, b, st)
    for k in (2, 8, 24):
        assert (residual.stored_residual(w, res, st, ref, k, 40).error
                < residual.stored_residual(w, plain, st, ref, k, 40).error)


def test_choose_residual_finds_the_smallest_rank(layer):
    w, b, st = layer
    ref = error.reference(w, b, st)
    res = residual.residual_of(w, st, 4, 64, "whiten")
    kb = residual.residual_break_rank(48, 96, 4, 64)
    errors = {k: residual.stored_residual(w, res, st, ref, k, kb).error for k in range(kb + 1)}
    eps = errors[10] * 1.0001
    c = search.choose_residual(w, b, res, st, eps)
    assert c.kind == "residual" and c.error <= eps
    assert c.rank == min(k for k, e in errors.items() if e <= eps)
    # an eps that even the largest worthwhile correction misses: kept as is
    kept = search.choose_residual(w, b, res, st, errors[kb] * 0.5)
    assert (kept.kind, kept.bits, kept.error) == ("keep", None, 0.0)


def test_residual_bytes_and_break_rank():
    for out_f, in_f, bits in ((48, 96, 4), (576, 1536, 4), (576, 576, 8), (7, 300, 8)):
        k = residual.residual_break_rank(out_f, in_f, bits, 64)
        above = quant.nbytes(out_f * in_f, 8 if bits == 4 else 16, 64)
        assert residual.residual_bytes(out_f, in_f, k, bits, 64) < above
        assert k == min(out_f, in_f) or residual.residual_bytes(out_f, in_f, k + 1, bits, 64) >= above
        assert residual.residual_bytes(out_f, in_f, 0, bits, 64) == quant.nbytes(out_f * in_f, bits, 64)
        assert residual.residual_bytes(out_f, in_f, 3, bits, 64) == (
            quant.nbytes(out_f * in_f, bits, 64) + lowrank.lowrank_bytes(out_f, in_f, 3, 8, 64))


def test_layer_options_offer_corrections_and_stored_of_rebuilds_them(layer):
    w, b, st = layer
    f = factorize("whiten", w, st)
    residuals = {(bits, block): residual.residual_of(w, st, bits, block, "whiten")
                 for bits, block in ((4, 64), (4, 256), (8, 64))}
    opts = layer_options(w, b, f, st, (4, 8), 64, elsize=4, residuals=residuals, weight=2.5)
    assert all(o.weight == 2.5 and o.cost == 2.5 * o.error ** 2 for o in opts)
    for bits, block in residuals:
        ranks = [o.rank for o in opts if o.kind == "residual" and o.bits == bits
                 and (o.block or 64) == block]
        assert ranks == rank_grid(residual.residual_break_rank(48, 96, bits, block))
    # the weight alone in larger blocks is one more dense option, cheaper than block 64
    big = [o for o in opts if o.kind == "dense" and o.block == 256]
    small = [o for o in opts if o.kind == "dense" and o.bits == 4 and o.block is None]
    assert len(big) == len(small) == 1 and big[0].bytes < small[0].bytes
    for o in (o for o in opts if o.kind == "residual" or o.block is not None):
        c = stored_of(o, w, b, f, st, 64, k_break=0, residual=residuals[o.bits, o.block or 64])
        assert (c.kind, c.rank, c.bits, c.error) == (o.kind, o.rank, o.bits, o.error)
        assert c.weight.block_size == (o.block or 64)
        parts = (c.weight,) if c.kind == "dense" else (c.u, c.v, c.weight)
        stored = sum(t.numel() * t.element_size() for q in parts for t in q.tensors("k").values())
        assert stored + (0 if c.s is None else 4 * c.s.numel()) + 4 * b.numel() == o.bytes
    with pytest.raises(ValueError, match="needs its Residual"):
        stored_of(next(o for o in opts if o.kind == "residual"), w, b, f, st, 64, 0)
    with pytest.raises(ValueError, match="needs its Residual"):  # the wrong block size
        stored_of(big[0], w, b, f, st, 64, 0, residual=residuals[4, 64])


@pytest.mark.parametrize("closed", [False, True])
def test_a_budgets_bases_cut_at_the_break_rank_give_the_same_options(layer, closed):
    """A budget's bases are factorized only to their break-even rank (`residual_of(cut=True)`):
    the options, closed-form estimates included (Σσ² of the cut-off triples kept aside), are
    those of the whole factors; a rank past the cut is refused, not silently shortened."""
    w, b, st = layer
    whole = {(4, 64): residual.residual_of(w, st, 4, 64, "whiten")}
    cut = {(4, 64): residual.residual_of(w, st, 4, 64, "whiten", cut=True)}
    kb = residual.residual_break_rank(48, 96, 4, 64)
    assert cut[4, 64].factors.max_rank == kb < whole[4, 64].factors.max_rank
    assert cut[4, 64].k_break(48, 96) == whole[4, 64].k_break(48, 96) == kb
    assert cut[4, 64].factors.total2() == pytest.approx(whole[4, 64].factors.total2(), rel=1e-6)
    got, want = (layer_options(w, b, None, st, (4,), 64, elsize=4, residuals=r, closed=closed)
                 for r in (cut, whole))
    assert [(o.kind, o.rank, o.bytes) for o in got] == [(o.kind, o.rank, o.bytes) for o in want]
    assert [o.error for o in got] == pytest.approx([o.error for o in want], rel=1e-6)
    ref = error.reference(w, b, st)
    with pytest.raises(ValueError, match="made to rank"):
        residual.stored_residual(w, cut[4, 64], st, ref, kb + 1, kb + 1)


def test_sensitivities_scale_error_to_loss_and_average_one():
    class Work:  # what `raw_sensitivity` reads of a LayerWork
        def __init__(self, out_f, grad2, scale):
            g = torch.Generator().manual_seed(out_f)
            self.w = torch.randn(out_f, 8, generator=g) * scale
            self.bias = None
            x = torch.randn(50, 8, generator=g, dtype=F64)
            self.stats = LayerStats(x.T @ x, x.sum(0), 50, grad2=grad2)

    works = [Work(4, 1.0, 1.0), Work(6, 3.0, 1.0), Work(4, 1.0, 2.0)]
    weights = measured.sensitivities([measured.raw_sensitivity(w) for w in works])
    assert sum(weights) == pytest.approx(3.0)
    raw = [w.stats.grad2 / (50 * w.w.shape[0]) * error.output_norm2(w.w, None, w.stats)
           for w in works]
    assert [a / b for a, b in zip(weights, raw)] == pytest.approx([weights[0] / raw[0]] * 3)
    assert weights[2] == pytest.approx(4 * weights[0])  # doubled weights: 4× the output energy
    works[1].stats.grad2 = None  # without gradients every layer weighs the same
    assert measured.sensitivities([measured.raw_sensitivity(w) for w in works]) == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_residual_artifact_round_trips(models, calib_file, tmp_path, arch):
    source = hf.load_source(str(models[arch]))
    settings = Settings(eps=0.02, bits=4, residual=True, method="whiten", calib=str(calib_file),
                        **CALIB)
    result = compress(source, settings)
    manifest = artifact.save(tmp_path / "out", source, result, settings)
    kinds = [p["kind"] for p in manifest["layers"]]
    assert "residual" in kinds and manifest["totals"]["residual_layers"] == kinds.count("residual")
    for p in manifest["layers"]:
        if p["kind"] == "residual":
            assert p["factor_bits"] == 8 and p["error"] <= 0.02
            assert p["bytes"] == residual.residual_bytes(p["out_features"], p["in_features"],
                                                       p["rank"], 4, 64) + 4 * p["out_features"] * p["bias"]
    assert_loads_as_compressed(source, result, tmp_path / "out")


def test_cli_residual_compress_and_inspect(models, calib_file, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["compress", str(models["llama"]), "-o", str(out), "--bits", "4",
                                 "--eps", "0.02", "--residual", "--method", "whiten",
                                 "--calib", str(calib_file), *FAST])
    assert r.exit_code == 0, r.output
    assert re.search(r"\d+ residual 4\+8", ANSI.sub("", r.stdout)), r.stdout
    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "dense+low-rank" in ANSI.sub("", r.stdout), r.output


def test_budget_weighs_layers_by_sensitivity_and_may_correct(models, calib_file, tmp_path):
    source = hf.load_source(str(models["llama"]))
    settings = Settings(budget_ratio=0.4, bits=4, method="whiten", calib=str(calib_file), **CALIB)
    result = compress(source, settings)
    manifest = artifact.save(tmp_path / "out", source, result, settings)
    b, layers = manifest["budget"], manifest["layers"]
    assert b["objective"] == "sensitivity-weighted error²"
    weights = [p["sensitivity"] for p in layers]
    assert sum(weights) == pytest.approx(len(layers)) and len(set(weights)) > 1
    # each layer's form weighed by the token probe too (a causal LM: `pipeline.probe`)
    assert all(p["token_factor"] > 0 for p in layers)
    assert any(p["token_factor"] != 1.0 for p in layers)
    assert b["error2"] == pytest.approx(math.fsum(p["sensitivity"] * p["token_factor"]
                                                  * p["error"] ** 2 for p in layers))
    assert manifest["totals"]["target_bytes"] <= b["requested_bytes"]
    if b["error_cap"] is not None:  # an allocation under that cap won the judging
        assert b["plan"] == f"error cap {b['error_cap']:g}"
        assert max(p["error"] for p in layers) <= b["error_cap"]
    else:  # plain quantization did
        assert b["plan"].endswith("no correction")
    json.dumps(manifest)  # plain data only
    assert_loads_as_compressed(source, result, tmp_path / "out")


def test_plan_records_the_block_size_of_each_layer(models, calib_file, tmp_path):
    """A budget may store a 4-bit weight in larger blocks; its plan entry says so and the
    artifact loads it with that block size."""
    from svdq.pipeline.compress import realize
    from svdq.pipeline.work import LayerWork

    source = hf.load_source(str(models["llama"]))
    name = "model.layers.0.mlp.down_proj"
    module = source.model.get_submodule(name)
    w = module.weight.detach().float()
    x = torch.randn(64, w.shape[1], dtype=F64)
    st = LayerStats(x.T @ x, x.sum(0), 64, x.abs().sum(0))
    res = residual.residual_of(w, st, 4, 256, "whiten")
    work = LayerWork(name, module, w, None, st, "whiten")
    for k in (0, 3):
        c = residual.stored_residual(w, res, st, error.reference(w, None, st), k, 10)
        plan, stored, _ = realize(work, c, Settings(block_size=64))
        assert plan.block_size == 256 and plan.kind == ("dense" if k == 0 else "residual")
        assert stored[name + ".svdq.weight.absmax"].numel() == -(-w.numel() // 256)


@pytest.mark.parametrize("block", [64, 256])
def test_refining_a_correction_keeps_its_bytes_and_lowers_its_error(layer, block):
    w, b, st = layer
    ref = error.reference(w, b, st)
    res = residual.residual_of(w, st, 4, block, "whiten")
    gains = []
    for k in (4, 16, 32):
        first = residual.stored_residual(w, res, st, ref, k, 40)
        refined = residual.refine_residual(w, first, st, ref, "whiten")
        assert (refined.kind, refined.rank, refined.bits) == ("residual", k, 4)
        assert refined.weight.block_size == block and refined.u.bits == 8
        assert refined.error <= first.error  # never worse: a round is kept only if it helps
        gains.append(first.error - refined.error)
        w_hat = refined.weight.dequantize() + (refined.u.dequantize().T * refined.s) @ refined.v.dequantize()
        assert error.error_norm2(w - w_hat, st) ** 0.5 / ref == pytest.approx(refined.error)
    assert max(gains) > 0  # and on this layer it does help somewhere
    dense = residual.stored_residual(w, res, st, ref, 0, 40)
    assert residual.refine_residual(w, dense, st, ref, "whiten") is dense
    c = search.choose_residual(w, b, res, st, 0.05, method="whiten")
    plain = search.choose_residual(w, b, res, st, 0.05)
    assert c.rank == plain.rank and c.error <= plain.error <= 0.05


@pytest.mark.parametrize("gptq", [False, True])
def test_refining_several_forms_together_equals_each_alone(layer, gptq, monkeypatch):
    """A budget's candidates refine a layer's corrections together (by GPTQ in one loop, or
    in several where `dense.STACK` is small); each comes out bit for bit as refined alone,
    and forms that are not corrections pass through untouched."""
    from svdq.algo import dense

    w, b, st = layer
    ref = error.reference(w, b, st)
    forms = [residual.stored_residual(w, residual.residual_of(w, st, bits, block, "whiten",
                                                              grid, gptq), st, ref, k, 40)
             for bits, block, grid, k in ((4, 64, "int", 8), (3, 64, "int", 16),
                                          (4, 256, "bnb", 4), (4, 64, "int", 0))]
    alone = [residual.refine_residual(w, f, st, ref, "whiten", gptq=gptq) for f in forms]
    for stack in (dense.STACK, 2 * w.numel()):
        monkeypatch.setattr(residual, "STACK", stack)
        together = residual.refine_residuals(w, forms, st, ref, "whiten", gptq=gptq)
        assert together[3] is forms[3]  # the base alone, kind dense
        for a, t in zip(alone, together):
            assert a.error == t.error and a.rank == t.rank
            if a.kind == "residual":
                assert all(torch.equal(x, y) for x, y in zip(a.weight.tensors("w").values(),
                                                             t.weight.tensors("w").values()))
                assert torch.equal(a.u.dequantize(), t.u.dequantize())
    if not gptq:  # some round helped (by GPTQ on this layer, none does)
        assert any(a is not f for a, f in zip(alone, forms))


def test_budget_leaves_out_large_errors_unless_it_must(models, calib_file):
    """Below what the capped forms (and 2-bit weights, 0.14 × fp16) can reach, the budget is
    still met, with larger errors."""
    source = hf.load_source(str(models["llama"]))
    settings = Settings(budget_ratio=0.12, bits=4, method="whiten", calib=str(calib_file), **CALIB)
    result = compress(source, settings)
    assert result.budget["error_cap"] is None and result.budget["plan"] == "no error cap"
    assert max(p["error"] for p in result.layers) > max(budget.ERROR_CAPS)
    assert sum(p["bytes"] for p in result.layers) <= result.budget["requested_bytes"]


def test_method_auto_whitens_corrections_and_keeps_svd_for_replacement():
    assert Settings().method == "svd" and Settings(eps=0.1, bits=4).method == "svd"
    assert Settings(residual=True).method == "whiten"
    assert Settings(budget_ratio=0.3).method == "whiten"
    assert Settings(budget_bytes=10 ** 6).method == "whiten"
    assert Settings(budget_ratio=0.3, method="fisher").method == "fisher"  # a choice is kept
    s = Settings(residual=True)
    assert Settings.from_dict(s.to_dict()) == s and s.to_dict()["_data"]["method"] == "whiten"


def test_a_whitened_bases_error_comes_from_its_factorization(layer, monkeypatch):
    """`residual_of` hands the base's error its whitened SVD found to `stored_residual` of
    that weight: no trace form for it; another target on the base gets its own."""
    w, b, st = layer
    ref = error.reference(w, b, st)
    res = residual.residual_of(w, st, 4, 64, "whiten")
    calls, real = [], error.error_norm2
    monkeypatch.setattr(error, "error_norm2", lambda d, s: calls.append(1) or real(d, s))
    residual.stored_residual(w, res, st, ref, 3, 40)
    assert calls == []
    residual.stored_residual(w * 0.9, res, st, ref, 3, 40)
    assert calls == [1]
