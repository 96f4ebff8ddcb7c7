"""`--embed-bits`: the token embedding stored quantized (a tied head stays tied), and
`--budget-scope all`: budgets that count the whole checkpoint."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from svdq import runtime
from svdq.cli import app
from conftest import FAST, compress_all, make_vision_model, one_line_error

CASES = {"llama": ["--eps", "0.3", "--embed-bits", "8"],  # tied lm_head
         "gpt2": ["--eps", "0.3", "--embed-bits", "4"],  # tied lm_head, Conv1D layers
         "bert": ["--eps", "0.3", "--embed-bits", "8"]}  # no head


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def artifacts(models, calib_file, tmp_path_factory):
    return compress_all(models, calib_file, tmp_path_factory.mktemp("embed"), CASES)


def outputs(model, arch):
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state if arch == "bert" else out.logits


def standalone(folder):
    spec = importlib.util.spec_from_file_location(f"loader_{folder.name}", folder / "svdq_loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(folder)


@pytest.mark.parametrize("arch", list(CASES))
def test_the_embedding_is_stored_quantized_and_every_loader_agrees(arch, artifacts, models):
    folder = artifacts[arch]
    manifest = json.loads((folder / runtime.MANIFEST).read_text())
    (entry,) = [p for p in manifest["layers"] if p.get("lookup") is not None]
    source = getattr(transformers, json.loads((models[arch] / "config.json").read_text())
                     ["architectures"][0]).from_pretrained(models[arch]).eval()
    emb = source.get_input_embeddings()
    assert manifest["format_version"] == 9 and entry["grid"] == "int"
    assert "token embedding" in (folder / "README.md").read_text()  # the model card says so
    assert entry["lookup"] == ([] if arch == "bert" else ["lm_head"])
    rows, cols = emb.weight.shape
    assert entry["bytes"] == sum(runtime.int_bytes(rows, cols, entry["bits"], 64))
    tensors = load_file(folder / "model.safetensors")
    assert tensors[entry["name"] + ".weight"].numel() == 0  # the marker
    assert not any(k.startswith("lm_head") for k in tensors)  # the head is the embedding's codes
    kept = runtime.load(folder)
    table = kept.get_input_embeddings()
    assert isinstance(table, runtime.StoredEmbedding)
    error = (table.dense_weight() - emb.weight).norm() / emb.weight.norm()
    assert error.item() == pytest.approx(entry["error"], rel=1e-4)
    assert entry["error"] < (0.01 if entry["bits"] == 8 else 0.15)
    ids = torch.randint(0, rows, (3, 7))
    assert torch.equal(table(ids), table.dense_weight()[ids])  # a lookup reads only its rows
    expanded = runtime.load(folder, dequantize=True)
    if arch != "bert":
        assert isinstance(kept.lm_head, runtime.TiedHead)
        assert expanded.lm_head.weight is expanded.get_input_embeddings().weight  # tied again
    reference = outputs(kept, arch)
    for other in (expanded, standalone(folder),
                  transformers.AutoModel.from_pretrained(folder) if arch == "bert"
                  else transformers.AutoModelForCausalLM.from_pretrained(folder)):
        assert torch.allclose(outputs(other.eval(), arch), reference, atol=1e-5)


def test_a_quantized_embedding_shrinks_the_file_and_finetune_keeps_it(artifacts, models,
                                                                      calib_file, tmp_path):
    plain = tmp_path / "plain"
    r = run("compress", models["llama"], "-o", plain, "--calib", calib_file, *FAST, "--eps", "0.3")
    assert r.exit_code == 0, r.output
    a, b = (json.loads((f / runtime.MANIFEST).read_text()) for f in (artifacts["llama"], plain))
    emb = next(p for p in a["layers"] if p.get("lookup") is not None)
    saved = emb["out_features"] * emb["in_features"] * 4 - emb["bytes"]  # float32 table
    assert b["totals"]["artifact_tensor_bytes"] - a["totals"]["artifact_tensor_bytes"] == saved
    tuned = tmp_path / "tuned"
    r = run("finetune", artifacts["llama"], "-o", tuned, "--calib", calib_file, "--steps", "4",
            "--seq-len", "32", "--eval-every", "2")
    assert r.exit_code == 0, r.output
    before, after = (load_file(f / "model.safetensors") for f in (artifacts["llama"], tuned))
    for key in before:
        if key.startswith(emb["name"] + "."):
            assert torch.equal(before[key], after[key])


def test_budget_scope_all_counts_the_whole_checkpoint(models, calib_file, tmp_path):
    for extra in (["--embed-bits", "8"], []):
        out = tmp_path / f"all{len(extra)}"
        r = run("compress", models["llama"], "-o", out, "--calib", calib_file, *FAST,
                "--ratio", "0.4", "--budget-scope", "all", *extra)
        assert r.exit_code == 0, r.output
        totals = json.loads((out / runtime.MANIFEST).read_text())["totals"]
        assert totals["artifact_tensor_bytes"] <= 0.4 * totals["checkpoint_fp16_bytes"]
    r = run("compress", models["llama"], "-o", tmp_path / "x", "--calib", calib_file, *FAST,
            "--ratio", "0.05", "--budget-scope", "all")
    assert "--embed-bits" in one_line_error(r)
    assert not (tmp_path / "x").exists()


def test_bad_embedding_requests_are_one_line(models, calib_file, tmp_path):
    base = ["compress", models["llama"], "-o", tmp_path / "x", "--calib", calib_file, *FAST]
    assert "--embed-bits must be 4 or 8" in one_line_error(run(*base, "--embed-bits", "3"))
    assert "give one of them" in one_line_error(run(*base, "--budget-scope", "all"))
    assert "targets or all" in one_line_error(run(*base, "--ratio", "0.3", "--budget-scope", "x"))
    vision = make_vision_model("resnet", tmp_path / "resnet")
    assert "no token embedding" in one_line_error(run("compress", vision, "-o", tmp_path / "y",
                                                      "--calib", calib_file, "--embed-bits", "8"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
