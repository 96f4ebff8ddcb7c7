"""The `svdq` command: compress, inspect, JSON output, one-line errors, interrupts, seeds.

Most runs go through typer's CliRunner (in process); one compress and one failure run as real
`svdq` subprocesses, through the installed console script.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import svdq
import svdq.pipeline.compress
from svdq import runtime
from svdq.cli import app

from conftest import make_text

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def compress_args(model: Path, out: Path, calib: Path | str, *extra: str) -> list[str]:
    return ["compress", str(model), "-o", str(out), "--eps", "0.3", "--bits", "8",
            "--calib", str(calib), *FAST, *extra]


def assert_one_line_error(result, code: int | None = None) -> str:
    """A failed run: non-zero exit, stderr one line starting with 'error:', no traceback."""
    stderr = ANSI.sub("", result.stderr)
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a crash
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def artifact_dir(models, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "gpt2-out"
    result = run(*compress_args(models["gpt2"], out, calib_file))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def wide(monkeypatch):
    """A console wide enough that every table row is one line."""
    from svdq import cli

    monkeypatch.setattr(cli.out, "_width", 300)


# ----------------------------------------------------------------------------- compress, inspect
def test_compress_writes_a_loadable_artifact(artifact_dir):
    manifest = json.loads((artifact_dir / "svdq.json").read_text())
    assert len(manifest["layers"]) == 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    assert {p["kind"] for p in manifest["layers"]} == {"lowrank", "dense"}
    assert manifest["calibration"]["tokens"] == 4 * 32
    assert manifest["settings"]["_data"]["eps"] == 0.3
    svdq.load(artifact_dir)


def test_compress_summary(models, calib_file, tmp_path):
    result = run(*compress_args(models["bert"], tmp_path / "out", calib_file))
    assert result.exit_code == 0, result.output
    text = ANSI.sub("", result.stdout)
    assert "12 target layers" in text and "low-rank" in text
    assert f"svdq inspect {tmp_path / 'out'}" in text
    assert "error" not in ANSI.sub("", result.stderr).lower()


def _table_rows(text: str, names: list[str]) -> list[str]:
    return [line for line in text.splitlines() if any(f" {n} " in line for n in names)]


def test_inspect_table_has_one_row_per_layer(artifact_dir, wide):
    manifest = json.loads((artifact_dir / "svdq.json").read_text())
    names = [p["name"] for p in manifest["layers"]]
    result = run("inspect", artifact_dir)
    assert result.exit_code == 0, result.output
    rows = _table_rows(ANSI.sub("", result.stdout), names)
    assert len(rows) == len(names) == 8
    for row, p in zip(rows, manifest["layers"]):  # sorted by name: model order here
        assert f" {p['name']} " in row
        assert f"{p['bytes']:,}" in row
        assert ("low-rank" in row) == (p["kind"] == "lowrank")

    result = run("inspect", artifact_dir, "--sort", "bytes", "--top", "3")
    assert result.exit_code == 0, result.output
    rows = _table_rows(ANSI.sub("", result.stdout), names)
    assert len(rows) == 3
    biggest = sorted(manifest["layers"], key=lambda p: p["bytes"], reverse=True)[:3]
    assert [f"{p['bytes']:,}" in row for row, p in zip(rows, biggest)] == [True] * 3


def test_inspect_json(artifact_dir):
    manifest = json.loads((artifact_dir / "svdq.json").read_text())
    result = run("inspect", artifact_dir, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["name"] for p in data["layers"]] == [p["name"] for p in manifest["layers"]]
    assert data["totals"] == manifest["totals"]
    assert all(p["ratio"] == pytest.approx(p["bytes"] / p["fp16_bytes"]) for p in data["layers"])

    top = json.loads(run("inspect", artifact_dir, "--json", "--sort", "bytes", "--top", "3").stdout)
    assert len(top["layers"]) == 3
    assert [p["bytes"] for p in top["layers"]] == sorted(
        (p["bytes"] for p in manifest["layers"]), reverse=True)[:3]
    errors = json.loads(run("inspect", artifact_dir, "--json", "--sort", "error").stdout)["layers"]
    assert [p["error"] for p in errors] == sorted((p["error"] for p in errors), reverse=True)


def test_inspect_unknown_sort(artifact_dir):
    line = assert_one_line_error(run("inspect", artifact_dir, "--sort", "size"))
    assert "--sort" in line


def test_compress_json(models, calib_file, tmp_path):
    out = tmp_path / "out"
    result = run(*compress_args(models["llama"], out, calib_file, "--json"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    manifest = json.loads((out / "svdq.json").read_text())
    assert data["totals"] == manifest["totals"]
    assert data["layers"] == manifest["layers"]
    assert data["calibration"]["source"] == str(calib_file.resolve())
    assert Path(data["output"]) == out


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("svdq")
    if not script.exists():
        found = shutil.which("svdq")
        assert found, "the svdq console script is not installed"
        script = Path(found)
    return [str(script)]


def test_real_subprocess(models, calib_file, tmp_path):
    """The installed console script, once for success and once for a failure."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_console_script() + compress_args(models["gpt2"], out, calib_file, "--json"),
                          capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    data = json.loads(proc.stdout)  # stdout is the JSON and nothing else
    assert data["totals"]["layers"] == 8
    assert (out / "svdq.json").is_file() and (out / "svdq_loader.py").is_file()

    bad = tmp_path / "bad"
    proc = subprocess.run(_console_script() + compress_args(models["bert"], bad, "self"),
                          capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert proc.returncode == 1
    lines = ANSI.sub("", proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "causal" in lines[0]
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- bad inputs
@pytest.fixture
def place(tmp_path):
    """An empty parent folder for the output, and a separate folder for inputs."""
    parent = tmp_path / "parent"
    parent.mkdir()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    return parent, inputs


def _nothing_left(parent: Path) -> None:
    assert sorted(p.name for p in parent.iterdir()) == [], list(parent.iterdir())


BAD = {
    # case: (model, extra arguments, calibration, words expected in the message)
    "unknown local path": ("missing", [], "file", "does not exist"),
    "eps 0": ("gpt2", ["--eps", "0"], "file", "--eps"),
    "eps 1.5": ("gpt2", ["--eps", "1.5"], "file", "--eps"),
    "bits 5": ("gpt2", ["--bits", "5"], "file", "--bits 5"),
    "bits 3 on bnb": ("gpt2", ["--bits", "3", "--grid", "bnb"], "file", "--grid int"),
    "unknown grid": ("gpt2", ["--grid", "fp8"], "file", "--grid"),
    "no target layers": ("gpt2", ["--include", "nothing*"], "file", "no layer"),
    "include a tied head": ("gpt2", ["--include", "lm_head"], "file", "tied to"),
    "calib missing": ("gpt2", [], "missing", "does not exist"),
    "calib binary": ("gpt2", [], "binary", "UTF-8"),
    "calib empty": ("llama", [], "empty", "empty"),
    "calib too short": ("llama", [], "short", "too short"),
    "calib self on bert": ("bert", [], "self", "causal"),
    "block size": ("gpt2", ["--block-size", "48"], "file", "--block-size"),
    "calib samples 0": ("gpt2", ["--calib-samples", "0"], "file", "--calib-samples"),
    "unknown method": ("gpt2", ["--method", "magic"], "file", "--method"),
    "cuda without gpu": ("gpt2", ["--device", "cuda"], "file", "cuda"),
}


@pytest.mark.parametrize("case", list(BAD), ids=[c.replace(" ", "-") for c in BAD])
def test_bad_input(case, models, calib_file, place, monkeypatch):
    parent, inputs = place
    model, extra, calib, words = BAD[case]
    if case == "cuda without gpu":
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present")
    model_path = inputs / "missing-model" if model == "missing" else models[model]
    calib_path = {"file": calib_file, "self": "self", "missing": inputs / "missing.txt",
                  "binary": inputs / "binary.txt", "empty": inputs / "empty.txt",
                  "short": inputs / "short.txt"}[calib]
    (inputs / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (inputs / "empty.txt").write_text("  \n\n ")
    (inputs / "short.txt").write_text(make_text(60))  # 60 tokens < 4 x 32
    out = parent / "out"
    args = ["compress", str(model_path), "-o", str(out), "--calib", str(calib_path), *FAST, *extra]
    if "--eps" not in extra:
        args += ["--eps", "0.3"]
    line = assert_one_line_error(run(*args), code=1)
    assert words in line, line
    _nothing_left(parent)


def test_unknown_hub_id_offline(place, calib_file, monkeypatch):
    parent, _ = place
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = assert_one_line_error(run(*compress_args("svdq-test/no-such-model-xyz", parent / "out",
                                                    calib_file)), code=1)
    assert "unreachable" in line and "offline" in line
    _nothing_left(parent)


def test_existing_output_needs_overwrite(models, calib_file, place):
    parent, _ = place
    out = parent / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    line = assert_one_line_error(run(*compress_args(models["bert"], out, calib_file)), code=1)
    assert "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert [p.name for p in parent.iterdir()] == ["out"]

    # --overwrite replaces artifacts only: a folder of the user's own files is refused, kept
    line = assert_one_line_error(run(*compress_args(models["bert"], out, calib_file, "--overwrite")))
    assert "not an svdq artifact" in line and "precious.txt" in line
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    (out / "precious.txt").unlink()

    assert run(*compress_args(models["bert"], out, calib_file)).exit_code == 0
    first = (out / "svdq.json").read_text()
    result = run(*compress_args(models["bert"], out, calib_file, "--overwrite", "--eps", "0.2"))
    assert result.exit_code == 0, result.output
    assert (out / "svdq.json").read_text() != first  # the artifact was replaced
    assert [p.name for p in parent.iterdir()] == ["out"]  # no .old, .partial or .lock left
    svdq.load(out)

    (parent / "a-file").write_text("x")
    line = assert_one_line_error(run(*compress_args(models["bert"], parent / "a-file", calib_file)))
    assert "not a folder" in line


def test_empty_output_folder_is_fine(models, calib_file, place):
    parent, _ = place
    (parent / "out").mkdir()
    result = run(*compress_args(models["bert"], parent / "out", calib_file))
    assert result.exit_code == 0, result.output
    assert (parent / "out" / "svdq.json").is_file()


@pytest.mark.parametrize("damage", ["flip", "truncate", "no manifest", "bad json", "version", "missing dir"])
def test_inspect_damaged_artifact(artifact_dir, tmp_path, damage):
    folder = tmp_path / "copy"
    shutil.copytree(artifact_dir, folder)
    tensors, manifest = folder / "model.safetensors", folder / "svdq.json"
    if damage == "flip":
        raw = bytearray(tensors.read_bytes())
        raw[-100] ^= 0x40
        tensors.write_bytes(bytes(raw))
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif damage == "no manifest":
        manifest.unlink()
    elif damage == "bad json":
        manifest.write_text("{\"format_version\": 1,")
    elif damage == "version":
        data = json.loads(manifest.read_text())
        data["format_version"] = 99
        manifest.write_text(json.dumps(data))
    else:
        folder = tmp_path / "nowhere"
    line = assert_one_line_error(run("inspect", folder), code=1)
    expected = {"flip": "checksum", "truncate": "checksum", "no manifest": "not an svdq artifact",
                "bad json": "not valid JSON", "version": "format version 99",
                "missing dir": "not an svdq artifact"}[damage]
    assert expected in line


# ----------------------------------------------------------------------------- interrupts
def test_ctrl_c_during_compression(models, calib_file, place, monkeypatch):
    parent, _ = place
    calls = []

    def interrupted(source, settings, progress=None, warn=None, **kwargs):
        calls.append(source.id)
        raise KeyboardInterrupt

    monkeypatch.setattr(svdq.pipeline.compress, "compress", interrupted)
    line = assert_one_line_error(run(*compress_args(models["gpt2"], parent / "out", calib_file)),
                                 code=130)
    assert calls == [str(models["gpt2"])]
    assert "interrupted" in line
    _nothing_left(parent)


def test_ctrl_c_while_saving(models, calib_file, place, monkeypatch):
    """Interrupted after model.safetensors is written: the temp folder goes too."""
    parent, _ = place
    written = []

    def interrupted(path):
        written.append(Path(path))
        assert Path(path).stat().st_size > 0
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime, "sha256", interrupted)
    line = assert_one_line_error(run(*compress_args(models["gpt2"], parent / "out", calib_file)),
                                 code=130)
    assert "interrupted" in line
    assert len(written) == 1 and written[0].parent.parent == parent.resolve()
    assert written[0].parent.name.endswith(".partial")
    _nothing_left(parent)


# ----------------------------------------------------------------------------- seeds
def test_seed_makes_runs_reproducible(models, tmp_path):
    def compress_self(name: str, seed: int) -> Path:
        out = tmp_path / name
        result = run("compress", models["llama"], "-o", out, "--eps", "0.35", "--bits", "8",
                     "--calib", "self", *FAST, "--seed", str(seed), "--json")
        assert result.exit_code == 0, result.output
        return out

    a, b, c = compress_self("a", 7), compress_self("b", 7), compress_self("c", 8)
    ma, mb, mc = (json.loads((x / "svdq.json").read_text()) for x in (a, b, c))
    assert ma["calibration"]["source"] == "self"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert ma["layers"] == mb["layers"] and ma["sha256"] == mb["sha256"]
    # another seed samples other text: other statistics, so other errors (and tensors)
    assert [p["error"] for p in ma["layers"]] != [p["error"] for p in mc["layers"]]
    assert ma["sha256"] != mc["sha256"]


def test_seed_picks_the_calibration_chunks_of_a_file(models, calib_file, tmp_path):
    def compress_file(name: str, seed: int) -> dict:
        out = tmp_path / name
        result = run(*compress_args(models["gpt2"], out, calib_file, "--seed", str(seed)))
        assert result.exit_code == 0, result.output
        return json.loads((out / "svdq.json").read_text())

    a, b, c = compress_file("a", 3), compress_file("b", 3), compress_file("c", 4)
    assert a["sha256"] == b["sha256"] and a["layers"] == b["layers"]
    assert [p["error"] for p in a["layers"]] != [p["error"] for p in c["layers"]]
