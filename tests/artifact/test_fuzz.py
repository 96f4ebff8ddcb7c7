"""Fuzz the readers: random damage to a tiny valid artifact either loads exactly the original
model or is refused with svdq's one error type (a one-line error in the CLI), never another
exception and never a model with other weights.

Damage is applied to the manifest (fields changed, removed, retyped), the tensors (truncated,
reshaped, retyped, removed, added) and the safetensors header bytes; each may be "re-sealed"
(checksums recomputed), so the checks behind the checksums are what is tested too. CI runs a
few dozen examples (seconds); the `slow` run many more.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import svdq
from svdq import runtime
from svdq.cli import app
from svdq.errors import SvdqError

from conftest import one_line_error

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10 ** 6) | st.floats(allow_nan=False)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int64)


@pytest.fixture(scope="module")
def original(models, calib_file, tmp_path_factory):
    """A tiny artifact with low-rank, dense-quantized, kept and tied layers, its weights, and
    its own standalone loader imported as a module."""
    out = tmp_path_factory.mktemp("fuzz") / "art"
    args = ["compress", str(models["gpt2"]), "-o", str(out), "--eps", "0.3", "--bits", "4",
            "--calib", str(calib_file), *FAST]
    assert CliRunner().invoke(app, args).exit_code == 0
    state = {k: v.clone() for k, v in svdq.load(out).state_dict().items()}
    spec = importlib.util.spec_from_file_location("fuzzed_loader", out / "svdq_loader.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    return out, state, loader


def _manifest_damage(draw, manifest: dict) -> None:
    layers = [p for p in manifest.get("layers", None) or [] if isinstance(p, dict)]
    where = draw(st.sampled_from(["top", "layer"])) if layers else "top"
    holder = manifest if where == "top" else layers[draw(st.integers(0, len(layers) - 1))]
    key = draw((st.sampled_from(sorted(holder)) if holder else st.nothing())
               | st.text(min_size=1, max_size=6))
    if draw(st.booleans()) and key in holder:
        del holder[key]
    elif key in holder and isinstance(holder[key], (int, float)) and not isinstance(holder[key], bool):
        holder[key] = draw(st.sampled_from([holder[key] + 1, holder[key] - 1, 0, -1, str(holder[key]),
                                            None, float(holder[key]) + 0.5]))
    else:
        holder[key] = draw(JSON)


def _tensor_damage(draw, tensors: dict) -> None:
    key = draw(st.sampled_from(sorted(tensors)))
    t = tensors[key]
    action = draw(st.sampled_from(["truncate", "reshape", "retype", "remove", "add"]))
    if action == "truncate" and t.numel() > 1:
        tensors[key] = t.reshape(-1)[: draw(st.integers(0, t.numel() - 1))].clone()
    elif action == "reshape" and t.numel() > 1:
        tensors[key] = t.reshape(-1, 1) if t.dim() != 2 or t.shape[1] != 1 else t.reshape(-1)
    elif action == "retype":
        tensors[key] = t.to(draw(st.sampled_from([d for d in DTYPES if d != t.dtype])))
    elif action == "remove":
        del tensors[key]
    else:
        tensors[key + draw(st.sampled_from([".extra", "x", ".codes"]))] = t.clone()


def damage(draw, folder: Path) -> tuple[list[str], bool]:
    """Damage the artifact in `folder` in place (1-3 kinds); returns them and whether the
    checksums were recomputed afterwards."""
    steps = draw(st.lists(st.sampled_from(["manifest", "tensors", "header"]), min_size=1, max_size=3))
    reseal = draw(st.booleans())
    mpath, tpath = folder / runtime.MANIFEST, folder / runtime.TENSORS
    for step in steps:
        if step == "manifest":
            manifest = json.loads(mpath.read_text())
            if not isinstance(manifest, dict):
                continue
            _manifest_damage(draw, manifest)
            mpath.write_text(json.dumps(manifest))
        elif step == "tensors":
            try:
                tensors = load_file(tpath)
            except Exception:  # noqa: BLE001 - a header damaged by an earlier step
                continue
            _tensor_damage(draw, tensors)
            save_file(tensors, str(tpath), metadata={"format": "pt"})
        else:
            raw = bytearray(tpath.read_bytes())
            header = 8 + int.from_bytes(raw[:8], "little")
            i = draw(st.integers(0, min(header, len(raw)) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
            tpath.write_bytes(bytes(raw))
    if reseal:
        manifest = json.loads(mpath.read_text())
        if isinstance(manifest, dict):
            manifest["sha256"] = runtime.sha256(tpath)
            manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
            mpath.write_text(json.dumps(manifest))
    return steps, reseal


def _same_model(model, state: dict) -> bool:
    mine = model.state_dict()
    return mine.keys() == state.keys() and all(
        mine[k].dtype == v.dtype and mine[k].shape == v.shape and torch.equal(mine[k], v)
        for k, v in state.items())


def check_damage(original, draw) -> None:
    out, state, loader = original
    folder = Path(tempfile.mkdtemp(prefix="svdq-fuzz-")) / "art"
    try:
        shutil.copytree(out, folder)
        steps = damage(draw, folder)
        try:
            runtime.read_manifest(folder)
        except runtime.ArtifactError:
            pass
        for load, error in ((svdq.load, SvdqError), (loader.load, loader.ArtifactError)):
            try:
                model = load(folder)
            except error as e:
                assert str(e) and "\n" not in str(e)
            else:
                assert _same_model(model, state), f"damage {steps} gave other weights"
        result = CliRunner().invoke(app, ["inspect", str(folder)])
        if result.exit_code != 0:
            one_line_error(result)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_damaged_artifacts_load_exactly_or_fail_cleanly(original, data):
    check_damage(original, data.draw)


@pytest.mark.slow
@settings(max_examples=400, **SETTINGS)  # derandomized too: CI must not fail by chance
@given(data=st.data())
def test_damaged_artifacts_many(original, data):
    check_damage(original, data.draw)
