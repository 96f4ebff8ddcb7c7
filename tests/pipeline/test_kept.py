"""Pass 1's statistics kept for pass 2 (svdq/pipeline/kept.py): the same artifact, bit for
bit, as gathering them again (its recorded errors to float64's last digits); a causal LM's pass 2 runs no main stream; past the limit
nothing is kept; nothing is left behind in the scratch folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from svdq import runtime
from svdq.cli import app
from svdq.models import blocks as model_blocks
from svdq.algo.dense import prequantize
from svdq.algo.residual import residual_of
from svdq.pipeline import budget, kept, two_pass

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "2"]


def compress(model, out, calib, *extra):
    r = CliRunner().invoke(app, ["compress", str(model), "-o", str(out), "--calib", str(calib),
                                 *FAST, *map(str, extra)])
    assert r.exit_code == 0, r.output
    manifest = runtime.read_manifest(out)
    return runtime.load_tensors(out, manifest), manifest["layers"], manifest["budget"]


@pytest.mark.parametrize("arch,extra", [("llama", ["--ratio", "0.3"]),
                                        ("gpt2", ["--ratio", "0.5", "--no-stream"]),
                                        ("bert", ["--ratio", "0.4"])])
def test_kept_statistics_give_the_same_artifact_with_fewer_forwards(models, calib_file,
                                                                    tmp_path, monkeypatch,
                                                                    arch, extra):
    calls = []
    real = model_blocks.run_block
    monkeypatch.setattr(model_blocks, "run_block",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    saved, loaded = [], []
    put, get = kept.Kept.put, kept.Kept.get
    monkeypatch.setattr(kept.Kept, "put", lambda s, i, w: saved.append(s.on) or put(s, i, w))
    monkeypatch.setattr(kept.Kept, "get", lambda s, i: loaded.append(get(s, i)) or loaded[-1])
    held, remade = [], []  # pass 1's bases handed to pass 2; bases pass 2 made again
    bases = kept.Kept.bases
    monkeypatch.setattr(kept.Kept, "bases", lambda s, n: held.append(bases(s, n)) or held[-1])
    monkeypatch.setattr(budget, "residual_of", lambda *a, **k: remade.append(1) or
                        residual_of(*a, **k))
    monkeypatch.setattr(two_pass, "prequantize", lambda *a, **k: remade.append(1) or
                        prequantize(*a, **k))
    ta, la, ba = compress(models[arch], tmp_path / "kept", calib_file, *extra)
    with_kept = len(calls)
    assert saved and all(saved) and loaded and all(x is not None for x in loaded)
    assert held and all(h is not None and h["quantized"] and h["residuals"]
                        and h["output_norm2"] > 0 for h in held)
    assert not remade
    calls.clear()
    monkeypatch.setattr(kept, "LIMIT", 0)  # nothing kept: pass 2 gathers them again
    tb, lb, bb = compress(models[arch], tmp_path / "again", calib_file, *extra)
    assert remade  # made again without what pass 1 kept: the same artifact, bit for bit
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert ba["candidates"] == bb["candidates"]
    # the errors pass 2 records: a base's from its SVD's energy when pass 1's bases are kept,
    # from its trace form when they are made again — the same to float64's last digits
    drop = lambda layers: [{k: v for k, v in x.items() if k != "error"} for x in layers]  # noqa: E731
    assert drop(la) == drop(lb)
    assert [x["error"] for x in la] == pytest.approx([x["error"] for x in lb], rel=1e-12)
    blocks = {"llama": 2, "gpt2": 2, "bert": 2}[arch]
    batches = 2  # 4 samples in batches of 2
    # a causal LM's pass 2 carries no main stream; an encoder's still does (its judge's
    # reference), but gathers nothing
    assert len(calls) - with_kept == (blocks * batches if arch != "bert" else 0)


def test_past_the_bases_limit_the_grams_are_still_kept(models, calib_file, tmp_path,
                                                        monkeypatch):
    ta, la, _ = compress(models["llama"], tmp_path / "all", calib_file, "--ratio", "0.3")
    monkeypatch.setattr(kept, "BASES_LIMIT", 0)
    held, loaded = [], []
    bases, get = kept.Kept.bases, kept.Kept.get
    monkeypatch.setattr(kept.Kept, "bases", lambda s, n: held.append(bases(s, n)) or held[-1])
    monkeypatch.setattr(kept.Kept, "get", lambda s, i: loaded.append(get(s, i)) or loaded[-1])
    tb, lb, _ = compress(models["llama"], tmp_path / "grams", calib_file, "--ratio", "0.3")
    assert held and all(h is None for h in held) and all(x is not None for x in loaded)
    assert la == lb and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_past_the_limit_nothing_is_kept_and_nothing_is_left(tmp_path):
    from svdq.algo.factorize import LayerStats
    from svdq.pipeline.work import LayerWork

    def work(name, st):
        return LayerWork(name, torch.nn.Linear(3, 2), None, None, st)

    shared = LayerStats(torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 5)
    box = kept.Kept(tmp_path, limit=2 * 72)  # two 3 × 3 float64 Grams
    box.put(0, [work("q", shared), work("k", shared)])  # one Gram, shared
    box.put(1, [])
    got = box.get(0)
    assert set(got) == {"q", "k"} and got["q"].cache is got["k"].cache
    assert torch.equal(got["q"].gram, shared.gram) and got["k"].tokens == 5
    assert box.get(1) == {} and box.get(0) is None  # handed out once
    box.put(2, [work("a", shared)])
    box.put(3, [work("b", LayerStats(torch.eye(3, dtype=torch.float64),
                                     torch.ones(3, dtype=torch.float64), 5))])  # over the limit
    assert not box.on and box.get(2) is None and not list(tmp_path.iterdir())



def test_a_disk_that_fills_while_statistics_are_kept_gathers_them_again(models, calib_file,
                                                                         tmp_path, monkeypatch):
    import errno

    def full(obj, path):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    ta, la, _ = compress(models["llama"], tmp_path / "kept", calib_file, "--ratio", "0.3")
    monkeypatch.setattr(kept.torch, "save", full)
    tb, lb, _ = compress(models["llama"], tmp_path / "full", calib_file, "--ratio", "0.3")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and la == lb
    assert not list((tmp_path / "full").rglob("stats-*"))


def test_a_disk_full_message_counts_the_scratch_folder(models, calib_file, tmp_path,
                                                       monkeypatch):
    """The candidates' tensors wait in the scratch folder: a disk that fills there gets one
    line whose figure counts what the folder held, and nothing is left behind."""
    from safetensors import SafetensorError

    from conftest import one_line_error
    from svdq.artifact import writer
    from svdq.pipeline import compress as pipeline_compress

    paths = []

    def full(group, path, **kwargs):
        paths.append(path)
        Path(path).write_bytes(b"\0" * 6_000_000)
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              "StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(writer, "save_file", full)
    monkeypatch.setattr(pipeline_compress, "CANDIDATE_FLUSH", 0)  # candidates go to files at once
    parent = tmp_path / "parent"
    r = CliRunner().invoke(app, ["compress", str(models["llama"]), "-o", str(parent / "out"),
                                 "--calib", str(calib_file), "--ratio", "0.3", *FAST])
    line = one_line_error(r)
    assert "filled up" in line and "scratch" in line
    assert float(line.split("at least ")[1].split(" MB")[0]) >= 6.0 + 4.19  # and the margin
    assert list(parent.iterdir()) == [] and ".scratch" in paths[0]


def test_kept_statistics_come_back_on_the_walks_device_once_per_input(tmp_path):
    """One copy per shared input on the device (`meta` stands in for a GPU here)."""
    from svdq.algo.factorize import LayerStats
    from svdq.pipeline.work import LayerWork

    ones = torch.ones(3, dtype=torch.float64)
    shared = LayerStats(torch.eye(3, dtype=torch.float64), ones, 5, ones.clone())
    box = kept.Kept(tmp_path, device="meta")
    box.put(0, [LayerWork(n, torch.nn.Linear(3, 2), None, None, shared) for n in ("q", "k")])
    got = box.get(0)
    assert got["q"].gram is got["k"].gram and got["q"].abs_total is got["k"].abs_total
    assert {t.device.type for t in (got["q"].gram, got["q"].total, got["q"].abs_total)} == {"meta"}


def test_layers_fed_one_input_share_gptq_loops_and_give_the_same_artifact(models, calib_file,
                                                                         tmp_path, monkeypatch):
    """Pass 1 quantizes q, k and v (and gate and up) in one GPTQ column loop; the artifact is
    bit for bit the one made with every weight in loops of its own (`STACK` at 1)."""
    from svdq.algo import dense
    loops = []
    real = dense.gptq_many
    monkeypatch.setattr(dense, "gptq_many", lambda ws, *a, **k: loops.append(
        {tuple(w.shape) for w in ws}) or real(ws, *a, **k))
    ta, la, ba = compress(models["llama"], tmp_path / "shared", calib_file, "--ratio", "0.3")
    assert any(len({s[0] for s in shapes}) > 1 for shapes in loops)  # q's rows beside k's
    shared = len(loops)
    loops.clear()
    monkeypatch.setattr(dense, "STACK", 1)
    tb, lb, bb = compress(models["llama"], tmp_path / "alone", calib_file, "--ratio", "0.3")
    assert len(loops) > shared and all(len(shapes) == 1 for shapes in loops)
    assert ba["candidates"] == bb["candidates"]
    # the errors pass 2 records: a base's from its SVD's energy when pass 1's bases are kept,
    # from its trace form when they are made again — the same to float64's last digits
    drop = lambda layers: [{k: v for k, v in x.items() if k != "error"} for x in layers]  # noqa: E731
    assert drop(la) == drop(lb)
    assert [x["error"] for x in la] == pytest.approx([x["error"] for x in lb], rel=1e-12)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
