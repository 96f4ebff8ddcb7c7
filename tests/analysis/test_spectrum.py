"""`svdq spectrum`: ranks by explained variance, the attention product's spectra computed
without the in × in matrix, the files written, rotary models and bad inputs refused."""
from __future__ import annotations

import builtins
import json

import pytest
import torch
from typer.testing import CliRunner

from svdq.analysis import attention, spectrum as sp
from svdq.cli import app
from conftest import one_line_error

FAST = ["--calib-samples", "4", "--calib-len", "32"]


def test_rank_for_reads_the_explained_variance():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1: 9/14 = 0.64, 13/14 = 0.93
    assert [sp.rank_for(s, p) for p in (0.5, 0.9, 0.95, 1.0)] == [1, 2, 3, 3]
    assert torch.allclose(sp.explained(s)[-1], torch.tensor(1.0, dtype=torch.float64))


def test_an_exactly_low_rank_weight_needs_its_rank():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 5, generator=g) @ torch.randn(5, 60, generator=g)
    assert sp.rank_for(torch.linalg.svdvals(w), 0.9999) == 5


def test_the_attention_product_spectra_are_those_of_the_explicit_product():
    g = torch.Generator().manual_seed(1)
    heads, d, n = 3, 4, 12
    wq, wk = torch.randn(heads * d, n, generator=g), torch.randn(heads * d, n, generator=g)
    x = torch.randn(50, n, generator=g)
    root = torch.linalg.cholesky((x.T @ x).double())
    plain = attention.product_spectra(wq, wk, heads)
    white = attention.product_spectra(wq, wk, heads, root)
    for h in range(heads):
        b = wq[h * d:(h + 1) * d].double().T @ wk[h * d:(h + 1) * d].double()
        want = torch.linalg.svdvals(b)[:d].float()
        torch.testing.assert_close(plain[h], want, rtol=1e-5, atol=1e-5)
        want_w = torch.linalg.svdvals(root.T @ b @ root)[:d].float()
        torch.testing.assert_close(white[h], want_w, rtol=1e-4, atol=1e-4)
        # the scores of every pair of calibration tokens are x_i B x_j: rank ≤ d exactly
        assert torch.linalg.matrix_rank(b) == d


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_spectrum_writes_its_files(models, calib_file, tmp_path, arch):
    out = tmp_path / "sp"
    r = CliRunner().invoke(app, ["spectrum", str(models[arch]), "-o", str(out), "--calib",
                                 str(calib_file), *FAST, "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (out / "spectrum.png").stat().st_size > 10_000
    result = json.loads((out / "spectrum.json").read_text())
    assert {k for layer in result["layers"] for k in layer["sv"]} == set(sp.KINDS)
    assert len(result["layers"]) == len({layer["name"] for layer in result["layers"]}) > 0
    kinds = {row["spectrum"] for row in summary["table"]}
    if arch == "llama":  # rotary: one matrix per head does not exist
        assert not summary["attention"]["applies"] and "rotary" in summary["attention"]["why_not"]
        assert "B" not in kinds
    else:
        assert summary["attention"]["applies"] and set(sp.HEAD_KINDS) <= kinds
        assert len(result["attention"]["blocks"]) == 2
        head = result["attention"]["blocks"][0]["heads"][0]
        assert len(head["B"]) == 64 // 4  # head width
    for row in summary["table"]:
        assert 1 <= row["r90"] <= row["r95"] <= row["r99"] <= row["full_rank"]


def test_spectrum_bad_inputs_get_one_line(models, calib_file, tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    r = CliRunner().invoke(app, ["spectrum", str(models["gpt2"]), "-o", str(f)])
    assert "is a file" in one_line_error(r)
    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    r = CliRunner().invoke(app, ["spectrum", str(models["gpt2"]), "-o", str(tmp_path / "o")])
    assert "--no-plot" in one_line_error(r)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_spectrum_of_image_models(vision_models, image_folder, tmp_path, arch):
    """ViT's attention product is found; ResNet, without attention, says so; convs have
    spectra like linear layers."""
    r = CliRunner().invoke(app, ["spectrum", str(vision_models[arch]), "-o", str(tmp_path / "sp"),
                                 "--calib", str(image_folder), "--calib-samples", "6",
                                 "--no-plot", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    if arch == "vit":
        assert summary["attention"]["applies"]
    else:
        assert not summary["attention"]["applies"]
        assert "no attention heads" in summary["attention"]["why_not"]
    result = json.loads((tmp_path / "sp" / "spectrum.json").read_text())
    assert len(result["layers"]) == {"vit": 12, "resnet": 5}[arch]
