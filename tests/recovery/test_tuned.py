"""What fine-tuning trains: the fake quantizer is the stored grid with a straight-through
gradient, and a tuned layer computes what its stored layer computes until it trains."""
from __future__ import annotations

import pytest
import torch

import svdq
from svdq import runtime
from svdq.algo import quant
from svdq.recovery import tuned


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_fake_quant_is_what_is_stored_with_an_identity_gradient(bits):
    t = torch.randn(37, 100, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q = tuned.fake_quant(t, bits, 64)
    stored = tuned.stored_factor(t, bits, 64)
    assert torch.equal(q, stored.dequantize())
    bnb = quant.quantize(t, bits, 64)
    if bits != 8:  # NF4 and float16: bitsandbytes' codes exactly
        assert torch.equal(stored.data, bnb.data)
    else:  # 8 bits: a scale per block that fits the asymmetric codes, never a worse error
        err = [(x.dequantize() - t).norm() for x in (stored, bnb)]
        assert err[0] <= err[1] * 1.0001
    q.sum().backward()
    assert torch.equal(t.grad, torch.ones_like(t))


@pytest.mark.parametrize("bits", [4, 8])
def test_storing_a_stored_factor_again_changes_nothing(bits):
    t = torch.randn(20, 100, generator=torch.Generator().manual_seed(2))
    once = quant.quantize(t, bits, 64).dequantize()  # as compress stores it
    again = tuned.stored_factor(once, bits, 64).dequantize()
    assert torch.equal(once, again)


def test_tuned_layers_compute_the_stored_layers_and_train_what_the_form_allows(tmp_path,
                                                                                models, calib_file):
    from typer.testing import CliRunner

    from svdq.cli import app

    out = tmp_path / "a"
    r = CliRunner().invoke(app, ["compress", str(models["llama"]), "-o", str(out), "--calib",
                                 str(calib_file), "--calib-samples", "4", "--calib-len", "32",
                                 "--ratio", "0.3"])
    assert r.exit_code == 0, r.output
    manifest = svdq.artifact.read(out)
    model = runtime.load(out, dtype="float32")
    ids = torch.randint(3, 40, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    plain = tuned.prepare(model, manifest)
    layers = [m for m in model.modules() if isinstance(m, tuned.TunedLinear)]
    assert layers and not any(isinstance(m, runtime.StoredLinear) for m in model.modules())
    for m in layers:
        m.qat = False
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("norm.weight") for n in plain) and set(plain) <= trainable
    for m in layers:  # dense parts frozen buffers; factors, Σ and biases trainable
        assert m.dense is None or not m.dense.requires_grad
        if m.rank:
            assert m.u.requires_grad and m.v.requires_grad and m.s.requires_grad
    assert not any("embed" in n for n in trainable)
