"""Calibration streams (svdq/models/streams.py): in memory or in files, read back unchanged."""
from __future__ import annotations

import torch

from svdq.models.streams import Scratch, Stream


def test_offloaded_stream_reads_back_bit_for_bit_and_drops_its_files(tmp_path):
    cpu = torch.device("cpu")
    with Scratch(tmp_path / "scratch") as room:
        s = Stream(cpu, folder=room.path)
        batches = [torch.randn(2, 5, 8, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)]
        for h in batches:
            s.append(h)
        assert len(list(s.folder.iterdir())) == 2 and s.nbytes == sum(h.numel() * h.element_size()
                                                                      for h in batches)
        for h, want in zip(s, batches):
            assert h.dtype == want.dtype and torch.equal(h, want)
        copy = s.copy()
        assert copy.folder != s.folder and torch.equal(copy[1], batches[1])
        s.drop()
        assert not s.folder.exists() and len(s) == 0 and torch.equal(copy[0], batches[0])
    assert not (tmp_path / "scratch").exists()


def test_memory_stream_keeps_its_tensors():
    s = Stream(torch.device("cpu"))
    h = torch.randn(1, 4, 3)
    s.append(h)
    assert s.folder is None and torch.equal(s[0], h) and len(s.like()) == 0


def test_offload_activations_puts_the_streams_in_files(models, calib_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from svdq.cli import app
    from svdq.models import streams

    written = []
    real = streams.save_file
    monkeypatch.setattr(streams, "save_file", lambda t, path: written.append(path) or real(t, path))
    args = ["compress", str(models["llama"]), "--eps", "0.3", "--calib", str(calib_file),
            "--calib-samples", "4", "--calib-len", "32", "--batch-size", "2"]
    assert CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a")]).exit_code == 0
    assert written == []  # small streams stay in memory
    assert CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b"),
                                    "--offload-activations"]).exit_code == 0
    assert len(written) >= 2 * 2  # each block's outputs, batch by batch
    assert not list(tmp_path.glob("**/stream-*"))  # and nothing is left of them
