"""Source streaming (svdq/models/stream.py): one block's weights in memory at a time, and the same
artifact, bit for bit, as compressing the model loaded whole."""
from __future__ import annotations

import json
import shutil
import sys
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
         ("llama", ["--eps", "0.1", "--residual", "--bits", "4"]),
         ("llama", ["--eps", "0.3", "--method", "fisher"]),
         ("llama", ["--ratio", "0.3"]), ("gpt2", ["--size", "40KB", "--refit"]),
         ("bert", ["--ratio", "0.4", "--offload-activations"])]


@pytest.mark.parametrize("arch,extra", CASES, ids=[f"{a}{''.join(e)}" for a, e in CASES])
def test_streamed_equals_whole_bit_for_bit(models, calib_file, tmp_path, arch, extra):
    a, b = tmp_path / "streamed", tmp_path / "whole"
    assert compress(models[arch], a, calib_file, *extra).exit_code == 0
    assert compress(models[arch], b, calib_file, *extra, "--no-stream").exit_code == 0
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    assert all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
    assert layers(a) == layers(b)


@pytest.mark.parametrize("arch,extra", [("llama", ["--eps", "0.3", "--sequential"]),
                                        ("gpt2", ["--eps", "0.3", "--sequential"]),
                                        ("llama", ["--ratio", "0.3"]), ("gpt2", ["--ratio", "0.5"])])
def test_only_the_running_block_is_in_memory(models, calib_file, tmp_path, monkeypatch, arch,
                                             extra):
    """Every block forward — statistics, the sequential rerun, gradients forward and backward,
    a budget's two passes and its candidates' streams — finds only its own block loaded."""
    from svdq.models import layers, load

    seen, places = [], []  # places: (a pass of the walk?, all outside read, any read)
    real, real_call = calibrate.run_block, calibrate.call_block
    state = {}

    def loaded_now(block):
        prefix, blocks = layers.blocks_of(state["model"])
        loaded = [i for i, b in enumerate(blocks)
                  if any(t.device.type != "meta" for t in list(b.parameters()) + list(b.buffers()))]
        seen.append((next(i for i, b in enumerate(blocks) if b is block), loaded))
        outside = [t.device.type != "meta" for n, t in state["model"].named_parameters()
                   if not n.startswith(prefix + ".")]
        caller = sys._getframe(2).f_code  # run_block calls call_block: count it once
        if caller.co_name != "run_block":
            places.append(("pipeline/walk.py" in caller.co_filename, all(outside), any(outside)))

    def watched(block, hidden, kwargs):
        loaded_now(block)
        return real(block, hidden, kwargs)

    def watched_call(block, hidden, kwargs):
        loaded_now(block)
        return real_call(block, hidden, kwargs)

    real_open = load.load_source

    def opened(*args, **kwargs):
        source = real_open(*args, **kwargs)
        state["model"] = source.model
        assert all(t.device.type == "meta" for b in layers.blocks_of(source.model)[1]
                   for t in b.parameters())  # nothing of the blocks is read up front
        return source

    monkeypatch.setattr(calibrate, "run_block", watched)
    monkeypatch.setattr(calibrate, "call_block", watched_call)
    monkeypatch.setattr(load, "load_source", opened)
    result = compress(models[arch], tmp_path / "out", calib_file, *extra)
    assert result.exit_code == 0, result.output
    assert len({i for i, _ in seen}) == 2
    assert all(loaded == [i] for i, loaded in seen), seen
    # embeddings, final norm and head: on meta while the passes walk the blocks, read for
    # the gradient pass (which needs the head)
    assert any(walking for walking, *_ in places)
    assert all(not any_read for walking, _, any_read in places if walking), places
    assert all(all_read for walking, all_read, _ in places if not walking), places
    if "--ratio" in extra:  # gradients (forward, backward) and two passes all walked
        assert len(seen) > 4 * 2 * 2


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


HUB_DRIVER = r'''
import sys
import svdq.models.stream as s
real = s.open_source
def opened(*a, **k):
    print("streamed", file=sys.stderr)
    return real(*a, **k)
s.open_source = opened
from svdq.cli import main
sys.argv = ["svdq", *sys.argv[1:]]
main()
'''


def test_a_hub_id_streams_from_its_downloaded_snapshot(models, calib_file, tmp_path):
    """The hub cache stands in for a download (tests never touch the network): the model
    streams from the snapshot's safetensors, and the manifest names the hub id and commit."""
    import os
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny-llama"
    shutil.copytree(models["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # as this process: float sums depend on the threads
    args = ["compress", "someorg/tiny-llama", "--eps", "0.3", "--calib", str(calib_file), *FAST,
            "-o", str(tmp_path / "out")]
    run = subprocess.run([sys.executable, "-c", HUB_DRIVER, *args], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "streamed" in run.stderr
    source = json.loads((tmp_path / "out" / runtime.MANIFEST).read_text())["source"]
    assert source == {"kind": "hub", "id": "someorg/tiny-llama", "revision": commit, "sha256": None}
    assert compress(models["llama"], tmp_path / "local", calib_file, "--eps", "0.3").exit_code == 0
    ta, tb = tensors(tmp_path / "out"), tensors(tmp_path / "local")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


RSS_PROBE = """
import torch
from svdq.models import stream

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))

stream.tame_malloc()
half = stream.MMAP_THRESHOLD // 2  # bytes: blocks below the mmap threshold come from the heap
big, pins = [], []
for _ in range((384 << 20) // half):  # each pinned in place by a 200 KB block after it
    big.append(torch.ones(half // 4))
    pins.append(torch.ones(50_000))
start = rss()
del big
freed = rss()
stream.give_back()
print(start, freed, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux")
def test_give_back_returns_the_heaps_free_pages():
    """Temporaries below the mmap threshold come from the heap (no page faults per use), and
    `give_back` hands what they leave behind to the system: here 384 MiB that free() alone
    keeps (each block is pinned below a live small one, so the heap's top cannot shrink)."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", RSS_PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    start, freed, after = map(int, out)
    assert freed > start - 100  # free() kept them resident
    assert after < start - 300  # give_back returned them


def test_give_back_trims_at_most_once_per_interval_unless_forced(monkeypatch):
    """A trim walks the heap: unforced calls closer than GIVE_EVERY apart trim once."""
    from svdq.models import stream
    trims, now = [], [1000.0]

    class Libc:
        def malloc_trim(self, pad):
            trims.append(now[0])

    monkeypatch.setattr(stream, "_LIBC", Libc())
    monkeypatch.setattr(stream, "_last_given", -float("inf"))
    monkeypatch.setattr(stream.time, "monotonic", lambda: now[0])
    stream.give_back()
    now[0] += stream.GIVE_EVERY / 2
    stream.give_back()  # too soon: skipped
    stream.give_back(force=True)
    now[0] += stream.GIVE_EVERY
    stream.give_back()
    assert trims == [1000.0, 1000.0 + stream.GIVE_EVERY / 2, 1000.0 + 1.5 * stream.GIVE_EVERY]
