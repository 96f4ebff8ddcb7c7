"""The output folder (svdq/artifact/outdir.py): what --overwrite may replace, the lock, what dead runs
left, the modes of a written artifact, a full disk."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import svdq
import svdq.models.load
from svdq.artifact import outdir, writer
from svdq.cli import app
from svdq.errors import SvdqError

from conftest import one_line_error

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]


def compress(model: Path, out: Path, calib: Path, *extra: str):
    args = ["compress", str(model), "-o", str(out), "--eps", "0.3", "--calib", str(calib), *FAST, *extra]
    return CliRunner().invoke(app, args)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_check_refuses_a_folder_of_other_files(tmp_path):
    out = tmp_path / "out"
    (out / "thesis").mkdir(parents=True)
    (out / "thesis.txt").write_text("years of work")
    with pytest.raises(SvdqError, match="not an svdq artifact"):
        outdir.check(out, overwrite=True)
    with pytest.raises(SvdqError, match="--overwrite"):
        outdir.check(out, overwrite=False)
    (out / "svdq.json").write_text("{}")
    outdir.check(out, overwrite=True)  # an artifact may be replaced
    outdir.check(tmp_path / "new", overwrite=False)


def test_lock_is_held_and_released(tmp_path):
    out = tmp_path / "out"
    with outdir.locked(out):
        stamp = outdir.lock_path(out).read_text().split()
        assert stamp[0] == str(os.getpid())
        with outdir.locked(out):  # re-entrant: save() inside the CLI's lock
            pass
        assert outdir.lock_path(out).exists()
    assert list(tmp_path.iterdir()) == []


def test_a_live_writer_refuses_a_second_run_at_start(models, calib_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        outdir.lock_path(out).write_text(f"{other.pid} {outdir._start_time(other.pid)}")
        loaded = []
        monkeypatch.setattr(svdq.models.load, "load_source", lambda *a, **k: loaded.append(a))
        line = one_line_error(compress(models["gpt2"], out, calib_file))
        assert f"another svdq run (pid {other.pid})" in line
        assert loaded == []  # refused before the model loaded
        assert outdir.lock_path(out).exists()  # the other run's lock is left alone
    finally:
        other.kill()
        other.wait()


def test_a_reused_pid_is_not_a_live_writer(tmp_path):
    out = tmp_path / "out"
    # our own pid, but another start time: the process that wrote it is gone
    outdir.lock_path(out).write_text(f"{os.getpid()} 1")
    if not outdir._start_time(os.getpid()):
        pytest.skip("no /proc here to tell processes apart")
    with outdir.locked(out):
        assert outdir.lock_path(out).read_text().split()[0] == str(os.getpid())


def test_dead_runs_leftovers_are_cleaned(models, calib_file, tmp_path):
    out = tmp_path / "out"
    outdir.lock_path(out).write_text(f"{dead_pid()} 0")
    partial = tmp_path / ".out.x1y2.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / ".other.a.partial"  # another output's temporary: not ours to remove
    mine.mkdir()
    result = compress(models["gpt2"], out, calib_file)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.a.partial", "out"]
    svdq.load(out)


def test_a_swapped_out_artifact_is_put_back(models, calib_file, tmp_path):
    """A run killed between moving the old artifact aside and the new one in."""
    out = tmp_path / "out"
    assert compress(models["gpt2"], out, calib_file).exit_code == 0
    before = (out / "svdq.json").read_text()
    out.rename(tmp_path / f".out.old-{dead_pid()}")
    outdir.lock_path(out).write_text(f"{dead_pid()} 0")
    with outdir.locked(out):
        assert (out / "svdq.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    svdq.load(out)


def test_artifact_modes_follow_the_umask(models, calib_file, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert compress(models["llama"], out, calib_file).exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)


def test_too_little_space_is_refused_before_writing(models, calib_file, tmp_path, monkeypatch):
    parent = tmp_path / "parent"
    real = outdir.shutil.disk_usage
    monkeypatch.setattr(outdir.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1000))
    line = one_line_error(compress(models["gpt2"], parent / "out", calib_file))
    assert "MB free" in line and "needs about" in line
    assert list(parent.iterdir()) == []


def test_a_disk_that_fills_up_mid_write(models, calib_file, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              "StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(writer, "save_file", full)
    parent = tmp_path / "parent"
    line = one_line_error(compress(models["gpt2"], parent / "out", calib_file))
    assert "filled up" in line and "MB needed" in line
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("where", ["preflight", "loading"])
def test_an_unreadable_input_is_one_line(models, calib_file, tmp_path, monkeypatch, where):
    """In process, as root: the permission checks are simulated (root may read anything)."""
    if where == "preflight":
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == Path(models["gpt2"])
                            else real(p, mode))
    else:
        def denied(spec, **kwargs):
            raise PermissionError(13, "Permission denied", str(Path(spec) / "config.json"))
        monkeypatch.setattr(svdq.models.load, "load_source", denied)
    line = one_line_error(compress(models["gpt2"], tmp_path / "out", calib_file))
    assert "permission denied" in line
    assert list(tmp_path.iterdir()) == []


def _as_nobody(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)),
                          capture_output=True, text=True, timeout=120, **kw)


def test_an_unreadable_input_folder_as_another_user(models, calib_file):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a command as another user")
    try:
        probe = _as_nobody([sys.executable, "-c", "import svdq.cli"])
    except OSError as e:
        pytest.skip(f"the dropped user cannot start this Python ({e.strerror}: {e.filename})")
    if probe.returncode != 0:
        pytest.skip(f"the dropped user cannot run this Python: {probe.stderr.strip()[-200:]}")
    base = Path(tempfile.mkdtemp(prefix="svdq-perm-"))  # pytest's tmp_path is root's alone
    try:
        base.chmod(0o755)
        folder, calib, outs = base / "secret", base / "calib.txt", base / "outs"
        shutil.copytree(models["gpt2"], folder)
        folder.chmod(0o700)  # root's: the user below may not read it
        shutil.copyfile(calib_file, calib)
        calib.chmod(0o644)
        outs.mkdir(mode=0o777)
        outs.chmod(0o777)
        cmd = [sys.executable, "-m", "svdq", "compress", str(folder), "-o", str(outs / "o"),
               "--calib", str(calib), *FAST]
        proc = _as_nobody(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(outs)})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert "permission denied" in lines[0] and "Traceback" not in proc.stderr
        assert list(outs.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
