"""svdq/artifact/writer.py: parts written as tensors come, joined into shards without reading them back."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from svdq import runtime
from svdq.artifact import writer
from svdq.errors import SvdqError


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(40):  # sizes of every residue mod 8, several dtypes
        n = int(torch.randint(1, 700, (1,), generator=g))
        dtype = (torch.float32, torch.float16, torch.uint8, torch.bfloat16, torch.int64)[i % 5]
        out[f"t{i:02d}"] = (torch.randn(n, generator=g) * 50).to(dtype)
    return out


def _header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8: 8 + n]), 8 + n


@pytest.mark.parametrize("shard_bytes", [10 ** 9, 3000])
def test_parts_join_into_shards_that_hold_exactly_the_tensors(tmp_path, monkeypatch, shard_bytes):
    monkeypatch.setattr(writer, "FLUSH_BYTES", 1000)
    w = writer.TensorWriter(tmp_path, shard_bytes)
    tensors = _tensors()
    items = list(tensors.items())
    for i in range(0, len(items), 3):
        w.add(dict(items[i: i + 3]))
    files = w.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # parts gone
    if shard_bytes > 10 ** 6:
        assert list(files) == [runtime.TENSORS]
    else:
        assert len(files) > 2 and (tmp_path / writer.INDEX).is_file()
        index = json.loads((tmp_path / writer.INDEX).read_text())
        assert index["weight_map"].keys() == tensors.keys()
    loaded = {}
    for name, digest in files.items():
        assert runtime.sha256(tmp_path / name) == digest
        loaded.update(load_file(tmp_path / name))
        header, start = _header(tmp_path / name)
        assert start % 8 == 0
        for key, info in header.items():  # every tensor aligned to its element size
            if key != "__metadata__":
                assert info["data_offsets"][0] % tensors[key].element_size() == 0, key
    assert loaded.keys() == tensors.keys()
    assert all(loaded[k].dtype == t.dtype and torch.equal(loaded[k], t) for k, t in tensors.items())


def test_a_tensor_stored_twice_is_refused(tmp_path):
    w = writer.TensorWriter(tmp_path, 10 ** 9)
    w.add({"a": torch.zeros(3)})
    with pytest.raises(SvdqError, match="stored twice"):
        w.add({"a": torch.ones(3)})


@pytest.mark.parametrize("shard_bytes", [10 ** 9, 3000])
def test_an_adopted_writer_joins_the_artifact_aligned(tmp_path, monkeypatch, shard_bytes):
    """A budget's winning candidate writes its tensors beside the artifact's; adopting them
    moves its parts (and the odd-sized tensors still waiting) in, without reading them back."""
    monkeypatch.setattr(writer, "FLUSH_BYTES", 1000)
    main_dir, other_dir = tmp_path / "main", tmp_path / "cand"
    main_dir.mkdir()
    other_dir.mkdir()
    w, other = writer.TensorWriter(main_dir, shard_bytes), writer.TensorWriter(other_dir, 10 ** 9, 700)
    tensors = {**_tensors(1), "odd": torch.arange(3, dtype=torch.uint8)}
    items = list(tensors.items())
    w.add(dict(items[:15]))
    other.add(dict(items[15:]))
    assert other._odd  # some of its tensors still wait for others to reach a multiple of 8
    w.adopt(other)
    assert not list(other_dir.iterdir())  # its parts moved
    with pytest.raises(SvdqError, match="stored twice"):
        w.adopt(other) or w.add({items[20][0]: torch.zeros(1)})
    files = w.close()
    loaded = {}
    for name in files:
        loaded.update(load_file(main_dir / name))
        header, start = _header(main_dir / name)
        for key, info in header.items():
            if key != "__metadata__":
                assert info["data_offsets"][0] % tensors[key].element_size() == 0, key
    assert loaded.keys() == tensors.keys() and w.total_bytes == sum(
        t.numel() * t.element_size() for t in tensors.values())
    assert all(torch.equal(loaded[k], t) for k, t in tensors.items())
