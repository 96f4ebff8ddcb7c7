"""Checks before the long work, a manifest that carries its own checksum, shapes checked before
use, the device refused before loading, warnings that come first, and small CLI manners."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import svdq
import svdq.models.load
from svdq import runtime
from svdq.calibration import text as calibrate
from svdq.cli import app
from svdq.errors import SvdqError

from conftest import as_format, make_text, one_line_error

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def compress(model: Path, out: Path, calib, *extra: str):
    return run("compress", model, "-o", out, "--calib", calib, *FAST, *extra)


@pytest.fixture(scope="module")
def artifact_dir(models, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "art"
    result = compress(models["gpt2"], out, calib_file, "--eps", "0.3")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model's weights are loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr(svdq.models.load, "load_source", refuse)


# ----------------------------------------------------------------------------- before loading
PRE = {
    "binary": (bytes(range(256)) * 8, "UTF-8"),
    "nul bytes": (b"the model \x00 layer " * 100, "NUL"),
    "empty": (b"  \n\n ", "empty"),
    "too short": (make_text(60).encode(), "too short"),
}


@pytest.mark.parametrize("case", list(PRE))
def test_calibration_file_is_checked_before_the_model_loads(case, models, tmp_path, no_model_load):
    data, words = PRE[case]
    calib = tmp_path / "calib.txt"
    calib.write_bytes(data)
    line = one_line_error(compress(models["llama"], tmp_path / "out", calib))
    assert words in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_cuda_without_a_gpu_is_refused_before_loading(models, calib_file, tmp_path, no_model_load):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    line = one_line_error(compress(models["gpt2"], tmp_path / "out", calib_file, "--device", "cuda"))
    assert "--device 'cuda'" in line and "no CUDA GPU" in line


def test_a_ratio_that_compresses_nothing_is_refused(models, calib_file, tmp_path, no_model_load):
    line = one_line_error(compress(models["gpt2"], tmp_path / "out", calib_file, "--ratio", "2"))
    assert "--ratio 2 compresses nothing" in line


def test_a_size_that_compresses_nothing_is_refused(models, calib_file, tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "calibration_ids",
                        lambda *a, **k: pytest.fail("calibrated before the check"))
    line = one_line_error(compress(models["gpt2"], tmp_path / "out", calib_file, "--size", "1GB"))
    assert "compresses nothing" in line and "float16" in line


def test_a_damaging_budget_warns_loudly(models, calib_file, tmp_path):
    result = compress(models["llama"], tmp_path / "out", calib_file, "--ratio", "0.1")
    assert result.exit_code == 0, result.output
    assert "expect a badly damaged model" in result.stderr
    manifest = json.loads((tmp_path / "out" / "svdq.json").read_text())
    assert "badly damaged" in manifest["budget"]["warning"]
    worst = max(p["error"] for p in manifest["layers"])
    assert f"worst {worst:.2f}" in manifest["budget"]["warning"]


# ----------------------------------------------------------------------------- the manifest
def _edit_rank(folder: Path, seal: bool) -> None:
    manifest = json.loads((folder / "svdq.json").read_text())
    layer = next(p for p in manifest["layers"] if p["kind"] == "lowrank")
    layer["rank"] += 1
    if seal:
        manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (folder / "svdq.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("seal", [False, True], ids=["edited", "edited-and-resealed"])
def test_an_edited_rank_is_one_line_everywhere(artifact_dir, calib_file, tmp_path, seal):
    folder = tmp_path / "copy"
    shutil.copytree(artifact_dir, folder)
    _edit_rank(folder, seal)
    words = "the manifest implies" if seal else "does not match its own checksum"
    if not seal:
        assert words in one_line_error(run("inspect", folder))
    with pytest.raises(SvdqError, match=words):
        svdq.load(folder)
    assert words in one_line_error(run("eval", folder, "--ppl", calib_file, "--max-tokens", "64"))
    proc = subprocess.run([sys.executable, str(folder / "svdq_loader.py"), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_old_artifacts_without_a_manifest_checksum_still_load(artifact_dir, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(artifact_dir, folder)
    manifest = as_format(folder, 2, checksum=False)
    svdq.load(folder)
    manifest["format_version"] = 3  # version 3 must carry it
    (folder / "svdq.json").write_text(json.dumps(manifest))
    with pytest.raises(SvdqError, match="own checksum"):
        svdq.load(folder)


def test_load_on_cuda_without_a_gpu_refuses_before_reading(artifact_dir, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a: pytest.fail("tensors were read"))
    with pytest.raises(SvdqError, match="no CUDA GPU"):
        svdq.load(artifact_dir, device="cuda")
    sys.path.insert(0, str(artifact_dir))
    try:
        import svdq_loader
        with pytest.raises(svdq_loader.ArtifactError, match="no CUDA GPU"):
            svdq_loader.load(artifact_dir, device="cuda:0")
    finally:
        sys.path.remove(str(artifact_dir))
        sys.modules.pop("svdq_loader", None)


# ----------------------------------------------------------------------------- warnings first
def test_the_offline_fallback_warns_before_sampling(monkeypatch):
    heard, order = [], []
    monkeypatch.setattr(calibrate, "_wikitext", lambda: None)
    monkeypatch.setattr(calibrate, "_self_text",
                        lambda *a: order.append(list(heard)) or torch.zeros(2, 4, dtype=torch.long))
    _, info = calibrate.calibration_ids(None, None, "auto", 2, 4, 1, 0, True, warn=heard.append)
    assert order == [heard] and "sampled from the model" in heard[0]
    assert "warning" in info


def test_sampling_shows_progress_over_tokens(models):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(models["gpt2"])
    tok = transformers.AutoTokenizer.from_pretrained(models["gpt2"])
    seen = []
    ids = calibrate._self_text(model, tok, 3, 6, 1, 0, lambda *a: seen.append(a))
    assert ids.shape == (3, 6)
    assert {s[0] for s in seen} == {"sampling calibration text"} and seen[-1][1:] == (18, 18)
    done = [s[1] for s in seen]
    assert done == sorted(done) and len(set(done)) > 2


# ----------------------------------------------------------------------------- manners
def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"svdq {svdq.__version__}"


@pytest.mark.parametrize("command,arg", [("compress", "MODEL"), ("eval", "MODEL"),
                                         ("sweep", "MODEL"), ("inspect", "ARTIFACT")])
def test_help_names_the_argument(command, arg):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "120"})
    usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
    assert usage.rstrip().endswith(arg) and "{" not in usage, usage


def test_the_standalone_loader_counts_tied_parameters_once(models, calib_file, tmp_path):
    out = tmp_path / "out"
    assert compress(models["llama"], out, calib_file, "--eps", "0.3").exit_code == 0  # tied head
    model = svdq.load(out)
    unique = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    proc = subprocess.run([sys.executable, str(out / "svdq_loader.py"), str(out)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"{unique:,} parameters" in proc.stdout
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied again, as loaded
