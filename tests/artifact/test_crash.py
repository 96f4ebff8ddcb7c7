"""Crash safety: a real `svdq compress` process killed with SIGKILL at several points leaves the
output path holding nothing or a whole artifact (the previous one, or the new one once it is in
place), and the next run cleans up what the dead one left."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import svdq
from svdq.cli import app

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]

# Runs the CLI in a fresh interpreter, with a trap that SIGKILLs the process at one point.
DRIVER = r'''
import os, pathlib, signal, sys
point = sys.argv[1]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
import svdq.artifact.writer, svdq.pipeline.compress
if point == "compressing":
    svdq.pipeline.compress.compress = lambda *a, **k: die()
elif point == "writing":
    real = svdq.artifact.writer.save_file
    def save_file(tensors, path, **kw):
        real(tensors, path, **kw)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)  # as if the kill came halfway through
        die()
    svdq.artifact.writer.save_file = save_file
else:  # "swapping": old artifact moved aside; "swapped": new one in place, old not yet removed
    real_rename = pathlib.Path.rename
    def rename(self, target):
        result = real_rename(self, target)
        name = pathlib.Path(target).name
        if (point == "swapping" and ".old-" in name) or (point == "swapped" and name == "out"):
            die()
        return result
    pathlib.Path.rename = rename
from svdq.cli import main
sys.argv = ["svdq", *sys.argv[2:]]
main()
'''


def _killed(args: list[str], point: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", DRIVER, point, *args], capture_output=True,
                          text=True, env=env, timeout=300)


def _args(model: Path, out: Path, calib: Path, eps: str) -> list[str]:
    return ["compress", str(model), "-o", str(out), "--eps", eps, "--calib", str(calib), *FAST,
            "--overwrite"]


@pytest.fixture(scope="module")
def previous(models, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crash") / "out"
    assert CliRunner().invoke(app, _args(models["gpt2"], out, calib_file, "0.3")).exit_code == 0
    return out


CASES = [("compressing", True), ("writing", True), ("swapping", True), ("swapped", True),
         ("compressing", False), ("writing", False)]


@pytest.mark.parametrize("point,over", CASES,
                         ids=[f"{p}-{'over-an-artifact' if o else 'into-nothing'}" for p, o in CASES])
def test_sigkill_leaves_nothing_or_a_whole_artifact(models, calib_file, previous, tmp_path,
                                                    point, over):
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "out"
    if over:
        shutil.copytree(previous, out)
    before = (previous / "svdq.json").read_text()

    killed = _killed(_args(models["gpt2"], out, calib_file, "0.2"), point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    if out.exists():  # a whole artifact: the previous one, or the new one once renamed in
        svdq.load(out)
        manifest = (out / "svdq.json").read_text()
        if point == "swapped":
            assert json.loads(manifest)["settings"]["_data"]["eps"] == 0.2
        else:
            assert manifest == before
    else:  # nothing: no artifact before, or the previous one is still beside it, whole
        assert not over or point == "swapping"
    assert any(p.name != "out" for p in parent.iterdir()), "the dead run's lock stays behind"

    again = CliRunner().invoke(app, _args(models["gpt2"], out, calib_file, "0.2"))
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in parent.iterdir()) == ["out"]  # lock, .partial, .old: gone
    svdq.load(out)

