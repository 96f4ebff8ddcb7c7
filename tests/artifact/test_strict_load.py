"""Strict loading (svdq.load, artifact.read, and the standalone loader copied into each
artifact): a damaged, truncated, edited or foreign artifact is refused with one line naming
what is wrong; older formats still load; the copied loader runs without svdq installed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdq
from svdq import artifact, runtime
from svdq.errors import SvdqError

from compressed import B8, G8, G16, L4, damaged_copy, outputs, rewrite_manifest
from conftest import as_format


# ----------------------------------------------------------------------------- standalone loader
LOADER_SCRIPT = r"""
import importlib.util, runpy, sys
site, jobs = sys.argv[1].split("\0"), sys.argv[2:]
sys.path.extend(site)  # plain folders: no .pth file runs, so svdq's editable finder is absent
assert importlib.util.find_spec("svdq") is None, "svdq is importable in the loader test"
import torch
for artifact, ids_file, out_file in zip(jobs[0::3], jobs[1::3], jobs[2::3]):
    sys.path.insert(0, artifact)
    sys.modules.pop("svdq_loader", None)
    import svdq_loader
    assert svdq_loader.__file__.startswith(artifact), svdq_loader.__file__
    model = svdq_loader.load(artifact)
    ids = torch.load(ids_file)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    torch.save(out.logits if hasattr(out, "logits") else out.last_hidden_state, out_file)
    sys.argv = [svdq_loader.__file__, artifact]  # and as a script: python svdq_loader.py ARTIFACT
    try:
        runpy.run_path(svdq_loader.__file__, run_name="__main__")
    except SystemExit as e:
        assert e.code == 0, e.code
    sys.path.remove(artifact)
assert not any(m == "svdq" or m.startswith("svdq.") for m in sys.modules), "svdq got imported"
"""


def test_standalone_loader_without_svdq(built, tmp_path):
    cases = {"llama": built(*L4), "gpt2": built(*G16), "bert": built(*B8)}
    script = tmp_path / "run_loader.py"
    script.write_text(LOADER_SCRIPT)
    jobs = []
    for name, b in cases.items():
        assert (b.out / "svdq_loader.py").read_bytes() == Path(runtime.__file__).read_bytes()
        torch.save(b.ids, tmp_path / f"{name}-ids.pt")
        jobs += [str(b.out), str(tmp_path / f"{name}-ids.pt"), str(tmp_path / f"{name}-out.pt")]
    paths = sysconfig.get_paths()
    site = "\0".join(sorted({paths["purelib"], paths["platlib"]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = "1"  # as in this process (see conftest.one_thread)
    # -I: no PYTHONPATH, no user site, no script folder; -S: no site module, so no .pth files
    proc = subprocess.run([sys.executable, "-I", "-S", str(script), site, *jobs],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("low-rank layers") == len(cases), proc.stdout
    for name, b in cases.items():
        got = torch.load(tmp_path / f"{name}-out.pt")
        assert torch.equal(got, outputs(svdq.load(b.out), b.ids)), name
        assert torch.equal(got, b.expected), name


# ----------------------------------------------------------------------------- strict loading
def _fails(folder: Path, match: str, verify: bool = True, read: bool = True) -> None:
    with pytest.raises(SvdqError, match=match) as info:
        svdq.load(folder, verify=verify)
    assert "\n" not in str(info.value)
    if read:
        with pytest.raises(SvdqError, match=match):
            artifact.read(folder, verify=verify)


def test_load_refuses_wrong_format_version(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    rewrite_manifest(folder, format_version=runtime.FORMAT_VERSION + 1)
    _fails(folder, f"format version {runtime.FORMAT_VERSION + 1}")


@pytest.mark.parametrize("version", [1, 4])
def test_load_reads_older_formats(built, tmp_path, version):
    """Version 2 added the residual kind, 5 moved quantized weights under NAME.svdq.weight
    beside an empty NAME.weight marker: artifacts written before still load, to the same
    model, in both loaders."""
    b = built(*G8)
    folder = damaged_copy(b, tmp_path)
    as_format(folder, version, checksum=version >= 3)
    assert not any(k.endswith(".svdq.weight.codes") for k in runtime.load_tensors(
        folder, runtime.read_manifest(folder)))
    for dequantize in (False, True):
        new, old = svdq.load(b.out, dequantize=dequantize), svdq.load(folder, dequantize=dequantize)
        assert torch.equal(outputs(old, b.ids), outputs(new, b.ids))


def test_load_refuses_checksum_mismatch(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    path = folder / runtime.TENSORS
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of tensor data: the file still parses
    path.write_bytes(bytes(raw))
    load_file(path)
    _fails(folder, "does not match the checksum")


def test_load_refuses_truncated_tensors(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    path = folder / runtime.TENSORS
    path.write_bytes(path.read_bytes()[:-1000])
    _fails(folder, "does not match the checksum")
    _fails(folder, "cannot read", verify=False, read=False)  # unverified: the file itself is refused
    artifact.read(folder, verify=False)  # the manifest alone is fine


def _rewrite_tensors(folder: Path, change) -> None:
    path = folder / runtime.TENSORS
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    rewrite_manifest(folder, sha256=runtime.sha256(path))  # consistent checksum: only content is wrong


def test_load_refuses_tensors_the_manifest_does_not_explain(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({"transformer.h.0.attn.extra": torch.zeros(3)}))
    artifact.read(folder)  # checksum and version are fine
    _fails(folder, "tensors the manifest does not explain", read=False)


def test_load_refuses_layer_missing_from_manifest(built, tmp_path):
    b = built(*G8)
    folder = damaged_copy(b, tmp_path)
    manifest = json.loads((folder / runtime.MANIFEST).read_text())
    lowrank = [p for p in manifest["layers"] if p["kind"] == "lowrank"]
    manifest["layers"].remove(lowrank[0])
    rewrite_manifest(folder, layers=manifest["layers"])
    # the model then expects the layer's plain weight, where only the empty marker is stored
    _fails(folder, f"tensor '{lowrank[0]['name']}.weight' is torch.uint8 \\(0,\\)", read=False)


@pytest.mark.parametrize("which", ["lowrank factor", "untouched", "bias", "codebook"])
def test_load_refuses_missing_tensor(built, tmp_path, which):
    b = built(*G8)
    lowrank = next(p["name"] for p in b.manifest["layers"] if p["kind"] == "lowrank")
    key = {"lowrank factor": lowrank + ".svdq.v.absmax", "untouched": "transformer.ln_f.weight",
           "bias": lowrank + ".bias", "codebook": "svdq.codebook.8"}[which]
    folder = damaged_copy(b, tmp_path)
    _rewrite_tensors(folder, lambda t: t.pop(key))
    _fails(folder, f"tensor '{key}' is missing", read=False)


def test_load_unverified_after_deleting_a_key(built, tmp_path):
    folder = damaged_copy(built(*L4), tmp_path)
    path = folder / runtime.TENSORS
    tensors = load_file(path)
    del tensors["model.norm.weight"]
    save_file(tensors, str(path))  # checksum left stale on purpose
    _fails(folder, "does not match the checksum")
    _fails(folder, "'model.norm.weight' is missing", verify=False, read=False)


def test_load_refuses_missing_manifest(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    (folder / runtime.MANIFEST).unlink()
    _fails(folder, "not an svdq artifact")
    _fails(tmp_path / "nowhere", "not an svdq artifact")


def test_load_refuses_invalid_json(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    text = (folder / runtime.MANIFEST).read_text()
    (folder / runtime.MANIFEST).write_text(text[: len(text) // 2])
    _fails(folder, "not valid JSON")
    (folder / runtime.MANIFEST).write_bytes(b"\xff\xfe{not json")
    _fails(folder, "not valid JSON")


def test_load_refuses_missing_tensors_file(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    (folder / runtime.TENSORS).unlink()
    _fails(folder, "is missing")
