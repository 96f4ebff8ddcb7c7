"""Sharded sources and sharded artifacts: the same tensors as one file, strict loading, and a
missing or damaged shard refused in one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

import svdq
from svdq import runtime
from svdq.cli import app
from svdq.errors import SvdqError

from conftest import one_line_error

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4", "--eps", "0.3"]


def compress(model: Path, out: Path, calib: Path, *extra: str) -> None:
    result = CliRunner().invoke(app, ["compress", str(model), "-o", str(out), "--calib",
                                      str(calib), *FAST, *extra])
    assert result.exit_code == 0, result.output


def all_tensors(folder: Path) -> dict:
    return runtime.load_tensors(folder, runtime.read_manifest(folder))


@pytest.fixture(scope="module")
def pair(models, calib_file, tmp_path_factory):
    """The same tiny Llama compressed into one file and into shards of at most 40 kB."""
    root = tmp_path_factory.mktemp("shards")
    compress(models["llama"], root / "one", calib_file)
    compress(models["llama"], root / "many", calib_file, "--shard-size", "40kB")
    return root / "one", root / "many"


def test_shards_hold_the_same_tensors_as_one_file(pair):
    one, many = pair
    manifest = json.loads((many / runtime.MANIFEST).read_text())
    shards = sorted(manifest["shards"])
    assert len(shards) > 2 and not (many / runtime.TENSORS).exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    def data_bytes(path: Path) -> int:  # the file less its length prefix and JSON header
        return path.stat().st_size - 8 - int.from_bytes(path.read_bytes()[:8], "little")
    assert all(data_bytes(many / s) <= 40_000 + 8
               or sum(t.numel() > 0 for t in load_file(many / s).values()) == 1
               for s in shards)  # a shard exceeds the size only when one tensor does (markers: empty)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    a, b = all_tensors(one), all_tensors(many)
    assert a.keys() == b.keys() == index["weight_map"].keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())


def test_a_sharded_artifact_loads_like_one_file(pair, models):
    one, many = pair
    reference = svdq.load(one)
    ids = torch.randint(3, reference.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.equal(svdq.load(many)(ids).logits, expected)
    proc = subprocess.run([sys.executable, str(many / "svdq_loader.py"), str(many)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr
    assert CliRunner().invoke(app, ["inspect", str(many)]).exit_code == 0


@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_a_missing_or_damaged_shard_is_one_line(pair, tmp_path, damage):
    folder = tmp_path / "copy"
    shutil.copytree(pair[1], folder)
    shard = folder / "model-00002-of-" f"{len(list(folder.glob('model-*'))):05d}.safetensors"
    if damage == "missing":
        shard.unlink()
    else:
        raw = bytearray(shard.read_bytes())
        raw[-10] ^= 0x10
        shard.write_bytes(bytes(raw))
    words = "is missing" if damage == "missing" else "does not match the checksum"
    with pytest.raises(SvdqError, match=words):
        svdq.load(folder)
    assert words in one_line_error(CliRunner().invoke(app, ["inspect", str(folder)]))


def test_a_sharded_source_compresses_as_one_file(models, calib_file, tmp_path):
    sharded = tmp_path / "src"
    model = transformers.AutoModelForCausalLM.from_pretrained(models["llama"])
    model.save_pretrained(sharded, max_shard_size="30KB")
    for f in Path(models["llama"]).glob("*token*"):
        shutil.copy(f, sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    compress(sharded, tmp_path / "a", calib_file)
    compress(models["llama"], tmp_path / "b", calib_file)
    a, b = all_tensors(tmp_path / "a"), all_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shard_size_is_checked(models, calib_file, tmp_path):
    result = CliRunner().invoke(app, ["compress", str(models["gpt2"]), "-o", str(tmp_path / "o"),
                                      "--calib", str(calib_file), "--shard-size", "lots"])
    assert "--shard-size takes a number" in one_line_error(result)
