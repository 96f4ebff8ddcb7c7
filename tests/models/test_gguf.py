"""GGUF sources stream from a safetensors copy under svdq's cache, converted once, tensor by
tensor (svdq/models/gguf.py): the copy holds exactly what transformers loads from the file."""
from __future__ import annotations

import pytest
import torch

from svdq import runtime
from svdq.models import gguf, load, stream
from svdq.models.layers import blocks_of


@pytest.mark.slow
def test_the_cache_holds_what_the_whole_load_gives_and_is_reused(tmp_path, monkeypatch):
    from svdq import assets

    path = assets.fetch("smollm2")  # the real Q4_1 SmolLM2 file (Llama: q/k are permuted back)
    monkeypatch.setattr(gguf, "cache_root", lambda: tmp_path / "cache")
    seen = []
    source = load.load_source(str(path), stream=True, report=lambda *a: seen.append(a))
    assert seen[-1][1] == seen[-1][2] > 200 and "converting" in seen[-1][0]  # one bar, to the end
    assert (source.kind, source.id) == ("gguf", str(path.resolve()))
    assert source.sha256 == runtime.sha256(path)
    prefix, blocks = blocks_of(source.model)
    assert all(p.device.type == "meta" for p in blocks.parameters())
    for i, block in enumerate(blocks):
        stream.materialize(block, f"{prefix}.{i}", source.weights, source.stream_dtype,
                           torch.device("cpu"))
    whole = load.load_source(str(path)).model.state_dict()
    mine = source.model.state_dict()
    assert mine.keys() == whole.keys()
    assert all(mine[k].dtype == whole[k].dtype and torch.equal(mine[k], whole[k]) for k in whole)
    monkeypatch.setattr(gguf, "convert", lambda *a, **k: pytest.fail("converted twice"))
    again = load.load_source(str(path), stream=True)
    assert again.weights.files.keys() == source.weights.files.keys()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [gguf.cached(path, source.sha256).name]
