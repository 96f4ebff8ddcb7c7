"""`svdq export`: a plain transformers folder and a base + PEFT adapter that compute what
`svdq.load` computes, strictly loaded, and the bad inputs refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from typer.testing import CliRunner

import svdq
from svdq import runtime
from svdq.cli import app
from conftest import compress_all, one_line_error

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]
# low-rank (Conv1D) at 4 bits; residual int3 with a tied head; a budget's mix on an encoder
CASES = {"gpt2": ["--eps", "0.6", "--bits", "4"],
         "llama": ["--eps", "0.08", "--bits", "3", "--residual"],
         "bert": ["--ratio", "0.3"]}
AUTO = {"gpt2": transformers.AutoModelForCausalLM, "llama": transformers.AutoModelForCausalLM,
        "bert": transformers.AutoModel}


@pytest.fixture(scope="module")
def artifacts(models, calib_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return compress_all(models, calib_file, root, CASES)


def out_of(model, arch: str) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (2, 12),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def run_export(artifact: Path, to: str, out: Path, *extra: str):
    return CliRunner().invoke(app, ["export", str(artifact), "--to", to, "-o", str(out), *extra])


def plain_load(arch: str, folder: Path, dtype=None):
    """Load with transformers alone, strictly (nothing missing, unexpected or re-initialized)."""
    model, info = AUTO[arch].from_pretrained(folder, output_loading_info=True, dtype=dtype)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert getattr(model.config, "quantization_config", None) is None
    return model.eval()


@pytest.mark.parametrize("arch", sorted(CASES))
def test_hf_export_loads_plainly_and_equals_svdq_load(artifacts, arch, tmp_path):
    r = run_export(artifacts[arch], "hf", tmp_path / "hf", "--dtype", "float32", "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    manifest = json.loads((artifacts[arch] / runtime.MANIFEST).read_text())
    with_low = sum(p["kind"] in ("lowrank", "residual") for p in manifest["layers"])
    assert with_low and record["lowrank_terms_folded"] == with_low
    theirs = plain_load(arch, tmp_path / "hf")
    for m in theirs.modules():
        assert not isinstance(m, runtime.StoredLinear)
    ours = svdq.load(artifacts[arch])
    torch.testing.assert_close(out_of(theirs, arch), out_of(ours, arch), rtol=1e-4, atol=1e-4)
    assert not (tmp_path / "hf" / runtime.MANIFEST).exists()
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_hf_export_in_float16_is_half_the_float32_bytes(artifacts, tmp_path):
    for dt in ("float32", "float16"):
        assert run_export(artifacts["llama"], "hf", tmp_path / dt, "--dtype", dt).exit_code == 0
    rec = {dt: json.loads((tmp_path / dt / "svdq_export.json").read_text())
           for dt in ("float32", "float16")}
    assert rec["float16"]["base_tensor_bytes"] * 2 == rec["float32"]["base_tensor_bytes"]
    model = plain_load("llama", tmp_path / "float16")
    assert next(model.parameters()).dtype == torch.float16
    ours = svdq.load(artifacts["llama"])
    torch.testing.assert_close(out_of(model, "llama"), out_of(ours, "llama"), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_peft_export_reproduces_svdq_load(artifacts, arch, tmp_path):
    peft = pytest.importorskip("peft")
    r = run_export(artifacts[arch], "peft", tmp_path / "p", "--dtype", "float32", "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    manifest = json.loads((artifacts[arch] / runtime.MANIFEST).read_text())
    low = {p["name"]: p["rank"] for p in manifest["layers"] if p["kind"] in ("lowrank", "residual")}
    assert record["lowrank_terms_in_adapter"] == len(low) and record["lowrank_terms_folded"] == 0
    if arch == "gpt2":  # ranks differ: rank_pattern and alpha_pattern carry them
        assert len(set(low.values())) > 1
    base = plain_load(arch, tmp_path / "p")
    ours = svdq.load(artifacts[arch])
    assert not torch.allclose(out_of(base, arch), out_of(ours, arch), atol=1e-3)  # the base alone differs
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "p" / "adapter")).eval()
    for name, rank in low.items():  # every term present, at its own rank, scaled by 1
        lora = model.base_model.model.get_submodule(name)
        assert lora.r["default"] == rank and lora.scaling["default"] == 1.0, name
    torch.testing.assert_close(out_of(model, arch), out_of(ours, arch), rtol=1e-4, atol=1e-4)
    with safe_open(str(tmp_path / "p" / "model.safetensors"), "pt") as f:
        for name in (n for n, p in ((p["name"], p) for p in manifest["layers"]) if p["kind"] == "lowrank"):
            assert not f.get_tensor(f"{name}.weight").any()  # a low-rank layer's base is zero


def test_peft_export_fp16_within_fp16_tolerance(artifacts, tmp_path):
    peft = pytest.importorskip("peft")
    assert run_export(artifacts["gpt2"], "peft", tmp_path / "p", "--dtype", "float16").exit_code == 0
    base = plain_load("gpt2", tmp_path / "p")
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "p" / "adapter")).eval()
    ours = svdq.load(artifacts["gpt2"])
    torch.testing.assert_close(out_of(model, "gpt2"), out_of(ours, "gpt2"), rtol=0.02, atol=0.02)


def test_export_refuses_bad_input_in_one_line(artifacts, tmp_path):
    assert "--to 'gguf' is unknown" in one_line_error(run_export(artifacts["gpt2"], "gguf", tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    assert "--dtype 'int8'" in one_line_error(
        run_export(artifacts["gpt2"], "hf", tmp_path / "x", "--dtype", "int8"))
    for inside in (artifacts["gpt2"], artifacts["gpt2"] / "hf", artifacts["gpt2"].parent):
        assert "inside it or around it" in one_line_error(
            run_export(artifacts["gpt2"], "hf", inside, "--overwrite"))
    assert not (artifacts["gpt2"] / "hf").exists()
    assert "no svdq.json" in one_line_error(run_export(tmp_path, "hf", tmp_path / "y"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert "--overwrite" in one_line_error(run_export(artifacts["gpt2"], "hf", tmp_path / "full"))
    assert "not an svdq artifact" in one_line_error(
        run_export(artifacts["gpt2"], "hf", tmp_path / "full", "--overwrite"))
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_export_overwrites_an_earlier_export(artifacts, tmp_path):
    assert run_export(artifacts["gpt2"], "peft", tmp_path / "e").exit_code == 0
    r = run_export(artifacts["gpt2"], "hf", tmp_path / "e", "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "e" / "adapter").exists()
    assert json.loads((tmp_path / "e" / "svdq_export.json").read_text())["to"] == "hf"


def test_peft_export_without_low_rank_terms_is_refused(models, calib_file, tmp_path):
    art = tmp_path / "dense"
    r = CliRunner().invoke(app, ["compress", str(models["llama"]), "-o", str(art), "--calib",
                                 str(calib_file), *FAST, "--eps", "0.3", "--bits", "8"])
    assert r.exit_code == 0, r.output
    assert "no low-rank terms" in one_line_error(run_export(art, "peft", tmp_path / "p"))
    assert not (tmp_path / "p").exists()


def test_a_sharded_artifact_exports_into_shards(artifacts, models, calib_file, tmp_path):
    art = tmp_path / "sharded"
    r = CliRunner().invoke(app, ["compress", str(models["llama"]), "-o", str(art), "--calib",
                                 str(calib_file), *FAST, *CASES["llama"], "--shard-size", "40KB"])
    assert r.exit_code == 0, r.output
    assert (art / "model.safetensors.index.json").is_file()
    r = run_export(art, "hf", tmp_path / "hf", "--dtype", "float32", "--shard-size", "40KB")
    assert r.exit_code == 0, r.output
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    theirs = plain_load("llama", tmp_path / "hf")
    torch.testing.assert_close(out_of(theirs, "llama"), out_of(svdq.load(art), "llama"),
                               rtol=1e-4, atol=1e-4)


def test_conv_layers_export_as_convolutions(vision_models, image_folder, tmp_path):
    """hf: every conv weight back in its kernel shape; peft: conv LoRA terms (A with the
    layer's kernel, B 1×1) that reproduce svdq.load."""
    peft = pytest.importorskip("peft")
    r = CliRunner().invoke(app, ["compress", str(vision_models["resnet"]), "-o", str(tmp_path / "a"),
                                 "--calib", str(image_folder), "--calib-samples", "8",
                                 "--eps", "0.05"])
    assert r.exit_code == 0, r.output
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ours = svdq.load(tmp_path / "a")
    with torch.no_grad():
        expected = ours(pixel_values=x).logits
    for to in ("hf", "peft"):
        r = run_export(tmp_path / "a", to, tmp_path / to, "--dtype", "float32")
        assert r.exit_code == 0, r.output
        model = transformers.ResNetForImageClassification.from_pretrained(tmp_path / to).eval()
        if to == "peft":
            model = peft.PeftModel.from_pretrained(model, str(tmp_path / to / "adapter")).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=x).logits, expected, rtol=1e-4, atol=1e-4)
