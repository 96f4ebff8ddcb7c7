"""Source streaming (svdq/models/stream.py): one block's weights in memory at a time, and the same
artifact, bit for bit, as compressing the model loaded whole."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from svdq import runtime
from svdq.cli import app
from svdq.models import blocks as calibrate

from conftest import one_line_error

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "2"]


def compress(model: Path, out: Path, calib, *extra: str):
    return CliRunner().invoke(app, ["compress", str(model), "-o", str(out), "--calib", str(calib),
                                    *FAST, *extra])


def tensors(folder: Path) -> dict:
    return runtime.load_tensors(folder, runtime.read_manifest(folder))


def layers(folder: Path) -> list:
    return json.loads((folder / runtime.MANIFEST).read_text())["layers"]


CASES = [("llama", ["--eps", "0.3"]), ("gpt2", ["--eps", "0.2", "--bits", "4"]),
         ("bert", ["--eps", "0.3"]), ("llama", ["--eps", "0.3", "--sequential"]),
         ("gpt2", ["--eps", "0.2", "--sequential", "--refit"]),
         ("llama", ["--eps", "0.1", "--residual", "--bits", "4"])]


@pytest.mark.parametrize("arch,extra", CASES, ids=[f"{a}{''.join(e)}" for a, e in CASES])
def test_streamed_equals_whole_bit_for_bit(models, calib_file, tmp_path, arch, extra):
    a, b = tmp_path / "streamed", tmp_path / "whole"
    assert compress(models[arch], a, calib_file, *extra).exit_code == 0
    assert compress(models[arch], b, calib_file, *extra, "--no-stream").exit_code == 0
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    assert all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
    assert layers(a) == layers(b)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_the_running_block_is_in_memory(models, calib_file, tmp_path, monkeypatch, arch):
    from svdq.models import layers, load

    seen = []
    real = calibrate.run_block
    state = {}

    def watched(block, hidden, kwargs):
        _, blocks = layers.blocks_of(state["model"])
        loaded = [i for i, b in enumerate(blocks)
                  if any(t.device.type != "meta" for t in list(b.parameters()) + list(b.buffers()))]
        seen.append((next(i for i, b in enumerate(blocks) if b is block), loaded))
        return real(block, hidden, kwargs)

    real_open = load.load_source

    def opened(*args, **kwargs):
        source = real_open(*args, **kwargs)
        state["model"] = source.model
        assert all(t.device.type == "meta" for b in layers.blocks_of(source.model)[1]
                   for t in b.parameters())  # nothing of the blocks is read up front
        return source

    monkeypatch.setattr(calibrate, "run_block", watched)
    monkeypatch.setattr(load, "load_source", opened)
    result = compress(models[arch], tmp_path / "out", calib_file, "--eps", "0.3", "--sequential")
    assert result.exit_code == 0, result.output
    assert len({i for i, _ in seen}) == 2
    assert all(loaded == [i] for i, loaded in seen), seen


def test_sampled_calibration_on_a_streamed_source(models, tmp_path):
    a, b = tmp_path / "streamed", tmp_path / "whole"
    result = compress(models["llama"], a, "self", "--eps", "0.3")
    assert result.exit_code == 0, result.output
    assert "reads all of it into memory once" in result.stderr
    assert compress(models["llama"], b, "self", "--eps", "0.3", "--no-stream").exit_code == 0
    ta, tb = tensors(a), tensors(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta) and ta.keys() == tb.keys()


@pytest.fixture
def sharded(models, tmp_path) -> Path:
    folder = tmp_path / "src"
    transformers.AutoModelForCausalLM.from_pretrained(models["llama"]).save_pretrained(
        folder, max_shard_size="30KB")
    for f in Path(models["llama"]).glob("*token*"):
        shutil.copy(f, folder)
    return folder


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_damaged_source_shard_is_one_line(sharded, calib_file, tmp_path, damage):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:200])
    line = one_line_error(compress(sharded, tmp_path / "out", calib_file, "--eps", "0.3"))
    assert shard.name in line
    assert not (tmp_path / "out").exists()


def test_stored_tensors_go_to_disk_while_the_walk_goes_on(models, calib_file, tmp_path, monkeypatch):
    from svdq.artifact import writer

    events = []
    real_flush, real_run = writer.TensorWriter._flush, calibrate.run_block
    monkeypatch.setattr(writer, "FLUSH_BYTES", 8192)
    monkeypatch.setattr(writer.TensorWriter, "_flush",
                        lambda self, last=False: events.append("file") or real_flush(self, last))
    monkeypatch.setattr(calibrate, "run_block",
                        lambda *a: events.append("block") or real_run(*a))
    out = tmp_path / "out"
    result = compress(models["llama"], out, calib_file, "--eps", "0.3")
    assert result.exit_code == 0, result.output
    assert events.index("file") < len(events) - 1 - events[::-1].index("block"), events
    assert (out / runtime.TENSORS).is_file() and not list(out.glob(".part-*"))
    whole = tmp_path / "whole"
    assert compress(models["llama"], whole, calib_file, "--eps", "0.3", "--no-stream").exit_code == 0
    ta, tb = tensors(out), tensors(whole)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_auto_dtype_without_one_in_the_config_is_the_checkpoints(models, tmp_path):
    from svdq.models import stream

    folder = tmp_path / "half"
    transformers.AutoModelForCausalLM.from_pretrained(models["llama"]).half().save_pretrained(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    config.dtype = None
    assert stream._checkpoint_dtype(config, stream.Weights(folder)) == torch.float16


def test_the_memory_estimate_counts_one_block(models):
    from svdq.config import Settings
    from svdq.models import load as hf
    from svdq.models import stream
    from svdq.models.layers import blocks_of

    source = hf.load_source(str(models["llama"]), stream=True)
    parts = stream.estimate(source, Settings(calib_samples=4, calib_len=32, batch_size=2))
    block = sum(p.numel() * p.element_size() for p in blocks_of(source.model)[1][0].parameters())
    cfg = source.model.config
    assert block < parts["one block"] < 3 * block + 12 * 4 * cfg.intermediate_size * cfg.hidden_size
    assert parts["calibration activations"] == 2 * 4 * 32 * cfg.hidden_size * 4
    assert parts["attention scores"] == 2 * cfg.num_attention_heads * 32 * 32 * 4
    # at most: q, k, v, o, gate, up take hidden-wide inputs, down the intermediate one
    assert parts["input statistics"] == 8 * (6 * cfg.hidden_size ** 2 + cfg.intermediate_size ** 2)
