"""`from_pretrained` on svdq artifacts: the same model as `svdq.load`, kept as stored, strict,
and a loud failure where svdq is not imported."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import svdq
from svdq import runtime
from conftest import compress_all

# every layer kind: low rank and dense at 4 and 8 bits, kept, residual; a budget's mix
CASES = {"gpt2": ["--eps", "0.03", "--bits", "4"],
         "llama": ["--eps", "0.08", "--bits", "3", "--residual"],
         "bert": ["--ratio", "0.3"]}
AUTO = {"gpt2": transformers.AutoModelForCausalLM, "llama": transformers.AutoModelForCausalLM,
        "bert": transformers.AutoModel}


@pytest.fixture(scope="module")
def artifacts(models, calib_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return compress_all(models, calib_file, root, CASES)


def ids_for(model) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def out_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", sorted(CASES))
def test_from_pretrained_equals_svdq_load(artifacts, arch):
    folder = artifacts[arch]
    manifest = json.loads((folder / runtime.MANIFEST).read_text())
    kinds = {(p["kind"], p["bits"]) for p in manifest["layers"]}
    assert len(kinds) > 1, kinds  # more than one stored form
    ours = svdq.load(folder)
    theirs = AUTO[arch].from_pretrained(folder)
    assert theirs.config.quantization_config.quant_method == "svdq"
    names = {n for n, m in theirs.named_modules() if isinstance(m, runtime.StoredLinear)}
    assert names == {p["name"] for p in manifest["layers"] if runtime.marked(p) or
                     p["bits"] == 16} and names
    ids = ids_for(ours)
    assert torch.equal(out_of(theirs.eval(), ids), out_of(ours, ids))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_from_pretrained_keeps_codes_at_another_dtype(artifacts):
    model = transformers.AutoModelForCausalLM.from_pretrained(artifacts["gpt2"], dtype=torch.bfloat16)
    stored = [m for m in model.modules() if isinstance(m, runtime.Packed)]
    assert stored and all(m.codes.dtype == torch.uint8 for m in stored)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    reference = svdq.load(artifacts["gpt2"])
    ids = ids_for(reference)
    got, want = out_of(model, ids).float(), out_of(reference, ids)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_resident_bytes_are_the_stored_bytes(artifacts):
    """Kept as stored, a loaded artifact holds its file's tensor bytes (within 10%; here the
    rotary and position buffers are the difference); de-quantized it holds more."""
    folder = artifacts["llama"]
    stored = sum(t.numel() * t.element_size() for t in
                 runtime.load_tensors(folder, runtime.read_manifest(folder)).values())

    def resident(model) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [*model.parameters(), *model.buffers()]
                    if t.untyped_storage().nbytes()}  # an empty marker may share an address
        return sum(storages.values())
    assert abs(resident(svdq.load(folder)) - stored) <= 0.1 * stored
    assert resident(svdq.load(folder, dequantize=True)) > 1.1 * stored


def test_without_svdq_from_pretrained_fails_loudly(artifacts):
    """A Python where svdq cannot be imported: transformers only warns about the unknown
    quantization method, but the layers' empty weight markers stop the load."""
    code = ("import sys; sys.modules['svdq'] = None\n"
            "import transformers\n"
            f"transformers.AutoModelForCausalLM.from_pretrained({str(artifacts['gpt2'])!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "ignore_mismatched_sizes" in proc.stderr, proc.stderr[-2000:]


def test_from_pretrained_refuses_a_missing_tensor_and_save_pretrained(artifacts, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(artifacts["gpt2"], folder)
    tensors = load_file(folder / runtime.TENSORS)
    key = next(k for k in tensors if k.endswith(".svdq.s") or k.endswith(".codes"))
    del tensors[key]
    save_file(tensors, str(folder / runtime.TENSORS), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="svdq artifact is inconsistent"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(artifacts["gpt2"])
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "again")


@pytest.mark.parametrize("kwargs", [{"device_map": "auto"}, {"device_map": {"": "cpu"}},
                                    {"low_cpu_mem_usage": True}])
def test_from_pretrained_takes_device_map_and_low_cpu_mem_usage(artifacts, kwargs):
    folder = artifacts["llama"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    assert any(isinstance(m, runtime.StoredLinear) for m in theirs.modules())
    ours = svdq.load(folder)
    ids = ids_for(ours)
    torch.testing.assert_close(out_of(theirs, ids), out_of(ours, ids), rtol=0, atol=0)


@pytest.mark.skipif(not runtime._int4_rows(), reason="no int4 CPU kernel in this torch")
def test_int4_layers_in_bfloat16_run_through_torch_kernel(models, calib_file, tmp_path):
    """An artifact of 4-bit integer layers and a 4-bit embedding with its tied head, loaded
    in bfloat16 by either loader, multiplies through torch's int4 kernel where the shapes allow
    (its codes move into the kernel's layout) and gives the float32 model's logits within
    bfloat16's rounding, again on a second forward; its state dict stays the artifact's."""
    folder = compress_all(models, calib_file, tmp_path, {"llama": [
        "--eps", "0.5", "--residual", "--bits", "4", "--grid", "int", "--block-size", "32",
        "--embed-bits", "4"]})["llama"]
    reference = svdq.load(folder)
    ids = ids_for(reference)
    want = out_of(reference, ids)
    for model in (svdq.load(folder, dtype="bfloat16"),
                  transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)):
        packed = [m for m in model.modules() if isinstance(m, runtime.Packed) and m.grid == "int"]
        assert packed and all(m.layout == 0 for m in packed)
        got = out_of(model.eval(), ids).float()
        # the kernel ran on every layer; the embedding's 75 rows are no multiple of 16: it
        # keeps the de-quantizer (a table in the kernel's layout: test_kernels.py)
        assert all(m.layout == (runtime._int4_rows() if m.shape[0] % 16 == 0 else 0)
                   for m in packed)
        assert sum(m.layout > 0 for m in packed) == len(packed) - 1
        assert (got - want).abs().max() < 0.05 * want.abs().max()
        assert torch.equal(out_of(model, ids).float(), got)  # a second forward: the same
        a, b = reference.state_dict(), model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a if "svdq" in k)
