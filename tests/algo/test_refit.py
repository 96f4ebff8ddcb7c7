"""--refit: U refitted by least squares against the source layer's outputs; with --sequential
on the source model's own inputs, paired token for token with the compressed stream's."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from svdq import artifact
from svdq.algo.error import reference, source_error
from svdq.algo.factorize import LayerStats, factorize
from svdq.algo.lowrank import stored_lowrank
from svdq.algo.refit import refit_u
from svdq.algo.residual import residual_of, stored_residual
from svdq.calibration import text as calibrate
from svdq.calibration.collect import Collector
from svdq.cli import app
from svdq.config import Settings
from svdq.models import load as hf
from svdq.pipeline import compress as pipeline
from svdq.pipeline.compress import compress
from conftest import ANSI


def streams(n=600, d=24, out=20, drift=0.3, seed=0):
    """Correlated source-stream inputs X₀, a drifted compressed stream X, a weight and their stats."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -1.5, d)
    x0 = torch.randn(n, d, generator=g) @ mix
    x = x0 + drift * torch.randn(n, d, generator=g) @ mix
    w = torch.randn(out, d, generator=g) / d ** 0.5
    x64, x064 = x.double(), x0.double()
    stats = LayerStats(x64.T @ x64, x64.sum(0), n, x64.abs().sum(0))
    stats.cross, stats.source_gram, stats.source_total = x64.T @ x064, x064.T @ x064, x064.sum(0)
    return x, x0, w, stats


def test_refit_is_the_least_squares_fit_to_the_source_outputs():
    x, x0, w, stats = streams()
    factors = factorize("svd", w, stats)
    ref = reference(w, None, stats)
    choice = stored_lowrank(w, factors, stats, ref, 6, 16, 64, k_break=10)  # float16 factors
    refit, before, after = refit_u(w, None, choice, stats)
    vt = choice.v.dequantize().double()
    z = x.double() @ vt.T  # what the stored V passes on
    m = torch.linalg.lstsq(z, x0.double() @ w.double().T).solution  # (k, out) = Σ Uᵀ
    got = (refit.u.dequantize().double() * refit.s.double()[:, None])
    assert torch.allclose(got, m, atol=2e-3 * m.abs().max())
    # the reported errors are those of the layers on the two streams, computed directly
    def direct(c):
        w_hat = (c.u.dequantize().T * c.s) @ c.v.dequantize()
        return float(torch.linalg.norm(x @ w_hat.T - x0 @ w.T) / torch.linalg.norm(x0 @ w.T))
    assert before == pytest.approx(direct(choice), rel=1e-4)
    assert after == pytest.approx(direct(refit), rel=1e-4)
    assert after < 0.9 * before  # the drift is large here: the refit must pull well toward X₀Wᵀ


@pytest.mark.parametrize("bits", [4, 8])
def test_refit_never_raises_the_source_error_and_keeps_bytes(bits):
    x, x0, w, stats = streams(seed=bits)
    factors = factorize("whiten", w, stats)
    ref = reference(w, None, stats)
    for k in (1, 4, 12):
        choice = stored_lowrank(w, factors, stats, ref, k, bits, 64, k_break=12)
        refit, before, after = refit_u(w, None, choice, stats)
        assert after <= before
        assert refit.u.data.shape == choice.u.data.shape and refit.u.bits == bits
        assert refit.rank == k and refit.v is choice.v


def test_refit_corrects_residual_layers_and_leaves_dense_ones():
    x, x0, w, stats = streams(seed=3)
    res = residual_of(w, stats, 4, 64, "whiten")
    ref = reference(w, None, stats)
    corrected = stored_residual(w, res, stats, ref, 4, k_break=10)
    refit, before, after = refit_u(w, None, corrected, stats)
    assert refit.kind == "residual" and refit.weight is corrected.weight and after < before
    dense = stored_residual(w, res, stats, ref, 0, k_break=10)
    same, b, a = refit_u(w, None, dense, stats)
    assert same is dense and a == b


def test_without_a_source_stream_refit_undoes_factor_quantization():
    x, _, w, stats = streams(seed=4)
    stats.cross = stats.source_gram = stats.source_total = None
    factors = factorize("svd", w, stats)
    choice = stored_lowrank(w, factors, stats, reference(w, None, stats), 5, 4, 64, k_break=10)
    refit, before, after = refit_u(w, None, choice, stats)
    assert before == pytest.approx(choice.error) and after < before
    assert refit.error == pytest.approx(after)
    assert source_error(w, None, w, stats) == 0.0


def test_collector_pairs_the_streams_token_for_token():
    g = torch.Generator().manual_seed(0)
    a, b = nn.Linear(8, 3), nn.Linear(8, 5)  # both fed the same tensor, as q and k are
    x0s = [torch.randn(2, 7, 8, generator=g) for _ in range(3)]
    xs = [x + 0.5 * torch.randn(2, 7, 8, generator=g) for x in x0s]
    with Collector({"a": a, "b": b}, paired=True) as c, torch.no_grad():
        for x0, x in zip(x0s, xs):
            with c.source():
                a(x0), b(x0)
            a(x), b(x)
    x0, x = torch.cat(x0s).reshape(-1, 8).double(), torch.cat(xs).reshape(-1, 8).double()
    for name in "ab":
        st = c.stats[name]
        assert st.tokens == 42
        for got, want in ((st.gram, x.T @ x), (st.cross, x.T @ x0),
                          (st.source_gram, x0.T @ x0), (st.source_total, x0.sum(0))):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)


def block1_inputs(model, tokenizer, settings):
    """Block 1's q_proj inputs when `model` runs on the calibration batches, (tokens, in)."""
    ids, _ = calibrate.calibration_ids(model, tokenizer, settings.calib, settings.calib_samples,
                                       settings.calib_len, settings.batch_size, settings.seed, True)
    seen = []
    layer = model.get_submodule("model.layers.1.self_attn.q_proj")
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for i in range(0, ids.shape[0], settings.batch_size):
            batch = ids[i: i + settings.batch_size]
            model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    handle.remove()
    return torch.cat(seen).double()


def test_sequential_refit_pairs_the_compressed_with_the_source_stream(models, calib_file,
                                                                   monkeypatch):
    source = hf.load_source(str(models["llama"]))
    settings = Settings(eps=0.3, bits=4, calib=str(calib_file), calib_samples=4, calib_len=32,
                        sequential=True, refit=True)
    seen, real = {}, pipeline.choose_form
    monkeypatch.setattr(pipeline, "choose_form",
                        lambda work, s: seen.setdefault(work.name, work.stats) and real(work, s))
    compress(source, settings)
    original = hf.load_source(str(models["llama"]))
    x0 = block1_inputs(original.model, original.tokenizer, settings)
    x = block1_inputs(source.model, source.tokenizer, settings)  # every block compressed now
    st = seen["model.layers.1.self_attn.q_proj"]
    assert not torch.allclose(x, x0, atol=1e-3)  # the streams differ, so this can tell them apart
    assert torch.allclose(st.gram, x.T @ x, rtol=1e-5, atol=1e-5)
    assert torch.allclose(st.cross, x.T @ x0, rtol=1e-5, atol=1e-5)
    assert torch.allclose(st.source_gram, x0.T @ x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_refit_artifact_round_trips(models, calib_file, tmp_path, arch):
    from test_residual import assert_loads_as_compressed

    source = hf.load_source(str(models[arch]))
    settings = Settings(eps=0.5, bits=4, sequential=True, refit=True, calib=str(calib_file),
                        calib_samples=4, calib_len=32, batch_size=4)
    result = compress(source, settings)
    manifest = artifact.save(tmp_path / "out", source, result, settings)
    layers = manifest["layers"]
    assert all(p["source_error"] <= p["source_error_before_refit"] for p in layers)
    assert any(p["refit"] for p in layers if p["kind"] == "lowrank")
    assert_loads_as_compressed(source, result, tmp_path / "out")


@pytest.mark.parametrize("flags", [["--refit"], ["--sequential", "--refit"]])
def test_cli_refit(models, calib_file, tmp_path, flags):
    out = tmp_path / "art"
    r = CliRunner().invoke(app, ["compress", str(models["llama"]), "--eps", "0.5", "--bits", "4",
                                 *flags, "--calib", str(calib_file), "--calib-samples", "4",
                                 "--calib-len", "32", "-o", str(out)])
    assert r.exit_code == 0, r.output
    warned = "warning: --sequential --refit fits each layer" in ANSI.sub("", r.stderr)
    assert warned == ("--sequential" in flags)
    m = re.search(r"refit: [1-9]\d* of \d+ factored layers; error against the source "
                  r"layers' outputs ([\d.]+) → ([\d.]+)", ANSI.sub("", r.stdout))
    assert m and float(m[2]) < float(m[1]), r.stdout
    manifest = json.loads((out / "svdq.json").read_text())
    assert manifest["settings"]["_data"]["refit"] is True
    assert any(p["refit"] for p in manifest["layers"])
    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.output


def test_budget_with_refit_records_the_refitted_errors(models, calib_file, tmp_path):
    source = hf.load_source(str(models["llama"]))
    settings = Settings(budget_ratio=0.3, bits=4, refit=True, calib=str(calib_file),
                        calib_samples=4, calib_len=32, batch_size=4)
    manifest = artifact.save(tmp_path / "out", source, compress(source, settings), settings)
    layers = manifest["layers"]
    assert manifest["totals"]["target_bytes"] <= manifest["budget"]["requested_bytes"]
    assert manifest["budget"]["error2"] == pytest.approx(
        sum(p["sensitivity"] * p["token_factor"] * p["error"] ** 2 for p in layers))
    assert all(p["source_error"] <= p["error"] + 1e-9 for p in layers)  # one stream: the same
