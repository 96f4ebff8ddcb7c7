"""A GGUF source is float32 only because transformers de-quantized it: the tensors svdq does
not quantize are then stored in bfloat16 (format 6 `stored_dtype`) and loaded back into the
float32 model; `--dtype float32` keeps float32."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

import svdq
from svdq import runtime
from svdq.cli import app
from svdq.errors import SvdqError
from svdq.models import load

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4", "--eps", "0.08",
        "--bits", "3", "--residual"]


@pytest.fixture(scope="module")
def pair(models, calib_file, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama (float32) compressed as if it came from a GGUF file: with --dtype auto
    and with --dtype float32."""
    real = load.load_source
    patch = pytest.MonkeyPatch()

    def as_gguf(*args, **kwargs):
        source = real(*args, **kwargs)
        if kwargs.get("dtype", "auto") == "auto":  # what load_source decides for a quantized GGUF
            source.kind, source.stored_dtype = "gguf", torch.bfloat16
        return source
    patch.setattr(load, "load_source", as_gguf)
    root = tmp_path_factory.mktemp("float_storage")
    try:
        for name, extra in (("auto", []), ("float32", ["--dtype", "float32"])):
            r = CliRunner().invoke(app, ["compress", str(models["llama"]), "-o", str(root / name),
                                         "--calib", str(calib_file), *FAST, *extra])
            assert r.exit_code == 0, r.output
    finally:
        patch.undo()
    return {name: root / name for name in ("auto", "float32")}


def test_untouched_tensors_are_stored_in_bfloat16(pair):
    auto, full = (json.loads((pair[n] / runtime.MANIFEST).read_text()) for n in ("auto", "float32"))
    assert auto["format_version"] == 6 and auto["stored_dtype"] == "bfloat16"
    assert auto["dtype"] == "float32" and any("bfloat16" in n for n in auto["notes"])
    assert "stored_dtype" not in full
    a, f = (load_file(pair[n] / runtime.TENSORS) for n in ("auto", "float32"))
    assert a.keys() == f.keys()
    cast = 0
    for key, t in f.items():
        if t.dtype == torch.float32 and not runtime.svdq_key(key):
            assert a[key].dtype == torch.bfloat16 and torch.equal(a[key], t.to(torch.bfloat16)), key
            cast += 1
        else:  # codes, scales, factors and Σ: the same compression, bit for bit
            assert a[key].dtype == t.dtype and torch.equal(a[key], t), key
    assert cast >= 5  # embeddings, norms, kept layers
    assert auto["totals"]["artifact_tensor_bytes"] < full["totals"]["artifact_tensor_bytes"]
    for entry in auto["layers"]:  # the plan counts what the files hold
        held = sum(a[k].numel() * a[k].element_size() for k in a if k.startswith(entry["name"] + "."))
        assert entry["bytes"] == held, entry["name"]
    kept = [p for p in auto["layers"] if p["bits"] is None]
    assert kept and all(p["bytes"] == p["fp16_bytes"] for p in kept)  # bfloat16: fp16's bytes


def test_only_a_gguf_file_with_quantized_tensors_is_float32_by_accident(tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    from svdq.models import gguf

    for name, quantized in (("f32", False), ("q8", True)):
        w = GGUFWriter(str(tmp_path / f"{name}.gguf"), "llama")
        w.add_tensor("a", np.ones((4, 32), dtype=np.float32))
        if quantized:
            w.add_tensor("b", quantize(np.ones((4, 32), dtype=np.float32), GGMLQuantizationType.Q8_0),
                         raw_dtype=GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert gguf.quantized(tmp_path / f"{name}.gguf") is quantized


def test_both_loaders_give_the_float32_model(pair):
    ours = svdq.load(pair["auto"])
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    reference = svdq.load(pair["float32"])
    expected = {k: (t.to(torch.bfloat16).float() if t.dtype == torch.float32
                    and not runtime.svdq_key(k) else t)
                for k, t in reference.state_dict().items()}
    got = ours.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(pair["auto"])
    ids = torch.randint(3, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_a_bad_stored_dtype_is_refused(pair, tmp_path):
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(pair["auto"], folder)
    manifest = json.loads((folder / runtime.MANIFEST).read_text())
    manifest["stored_dtype"] = "int8"
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (folder / runtime.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SvdqError, match="stored_dtype 'int8' is no float dtype"):
        svdq.load(folder)


def test_loaded_in_bfloat16_it_holds_about_the_file(pair):
    manifest = json.loads((pair["auto"] / runtime.MANIFEST).read_text())
    model = svdq.load(pair["auto"], dtype="bfloat16")
    seen, held = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.untyped_storage().nbytes() and t.untyped_storage().data_ptr() not in seen \
                and "rotary" not in name:  # an empty marker may share a real storage's address
            seen.add(t.untyped_storage().data_ptr())
            held += t.untyped_storage().nbytes()
        if t.is_floating_point() and not runtime.svdq_key(name) and "rotary" not in name:
            assert t.dtype == torch.bfloat16, name
    stored = manifest["totals"]["artifact_tensor_bytes"]
    assert abs(held - stored) <= 0.1 * stored, (held, stored)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(pair["auto"], dtype=torch.bfloat16)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model(ids).logits.float(), theirs(ids).logits.float()
    torch.testing.assert_close(ours, ref, rtol=0.02, atol=0.02)
    full = svdq.load(pair["auto"])(ids).logits
    assert (ours - full).abs().max() < 0.1 * full.abs().max()  # bfloat16 compute, same model


def test_a_dtype_that_cannot_run_is_refused(pair):
    with pytest.raises(SvdqError, match="dtype 'int8' cannot run a model"):
        svdq.load(pair["auto"], dtype="int8")


@pytest.mark.parametrize("version", [4, 5])
def test_dtype_leaves_older_formats_stored_forms_as_stored(models, calib_file, tmp_path, version):
    """Before format 5 a quantized weight lies under NAME.weight.*: its float32 absmax must
    not be taken for one of the model's own tensors and rounded to bfloat16."""
    from conftest import as_format

    out = tmp_path / "a"
    r = CliRunner().invoke(app, ["compress", str(models["llama"]), "-o", str(out), "--calib",
                                 str(calib_file), *FAST[:6], "--eps", "0.3", "--bits", "8"])
    assert r.exit_code == 0, r.output
    as_format(out, version)
    model = svdq.load(out, dtype=torch.bfloat16)
    packed = [m for m in model.modules() if isinstance(m, runtime.Packed)]
    assert packed and all(p.absmax.dtype == torch.float32 for p in packed if p.grid == "bnb")
    assert model.get_submodule("model.embed_tokens").weight.dtype == torch.bfloat16
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = svdq.load(out)(ids).logits
        torch.testing.assert_close(model(ids).logits.float(), full, rtol=0.05, atol=0.05)


def test_a_bfloat16_stored_artifact_exports(pair, tmp_path):
    r = CliRunner().invoke(app, ["export", str(pair["auto"]), "--to", "hf", "-o", str(tmp_path / "hf"),
                                 "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ours = svdq.load(pair["auto"])
    ids = torch.randint(3, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    auto = CliRunner().invoke(app, ["export", str(pair["auto"]), "--to", "hf", "-o",
                                    str(tmp_path / "bf16"), "--json"])
    assert json.loads(auto.stdout)["dtype"] == "bfloat16"  # auto: the stored dtype, not float32
