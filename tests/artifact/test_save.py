"""artifact.save: written in a temporary folder and moved into place, so a failure at any step
leaves no partial output and keeps an artifact it was to replace; a folder of other files is
never replaced."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import svdq
from svdq import artifact, runtime
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.models import load as hf
from svdq.pipeline.compress import compress

from compressed import B8, CALIB, outputs


# ----------------------------------------------------------------------------- atomic save
def test_save_removes_its_temp_folder_on_failure(models, calib_file, tmp_path, monkeypatch):
    source = hf.load_source(str(models["bert"]))
    settings = Settings(eps=0.3, bits=8, calib=str(calib_file), **CALIB)
    result = compress(source, settings)
    parent = tmp_path / "parent"
    out = parent / "out"
    seen = []

    def boom(path):
        seen.append(Path(path))
        assert Path(path).is_file() and Path(path).stat().st_size > 0  # tensors already written
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runtime, "sha256", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        artifact.save(out, source, result, settings)
    assert seen and seen[0].parent.name.endswith(".partial")
    assert list(parent.iterdir()) == []

    # overwriting: a failed save leaves the old artifact in place, untouched
    monkeypatch.undo()
    artifact.save(out, source, result, settings)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(runtime, "sha256", boom)
    with pytest.raises(RuntimeError):
        artifact.save(out, source, result, settings, overwrite=True)
    assert [p.name for p in parent.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # the last step fails (the finished folder cannot be renamed into place): the old
    # artifact, already moved aside, is put back
    monkeypatch.undo()
    rename = Path.rename

    def failing_rename(self, target):
        if self.name.endswith(".partial"):
            raise OSError("rename refused")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="rename refused"):
        artifact.save(out, source, result, settings, overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in parent.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_save_refuses_non_empty_output(built, tmp_path):
    b = built(*B8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SvdqError, match="not empty"):
        artifact.save(out, b.source, b.result, b.settings)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(SvdqError, match="not an svdq artifact"):  # overwrite replaces artifacts only
        artifact.save(out, b.source, b.result, b.settings, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    (out / "svdq.json").write_text("{}")  # an artifact (of sorts): replaced
    artifact.save(out, b.source, b.result, b.settings, overwrite=True)
    assert torch.equal(outputs(svdq.load(out), b.ids), b.expected)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .old, .partial or .lock left
