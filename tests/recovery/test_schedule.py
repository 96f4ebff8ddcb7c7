"""Schedules in compress: the stages' targets, the same final budget for every schedule, the
source recorded as the original, fine-tuning between stages, and nothing left behind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import svdq
from svdq.cli import app
from svdq.config import Settings
from svdq.recovery import finetune as ft, schedule
from conftest import one_line_error

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]


def compress(model: Path, out: Path, calib: Path, *extra: str):
    return CliRunner().invoke(app, ["compress", str(model), "-o", str(out), "--calib",
                                    str(calib), *FAST, "--json", *extra])


def test_progressive_stages_fall_geometrically_to_the_target():
    s = schedule.stage_settings(Settings(budget_ratio=0.2), "progressive", 4, ("h", 2))
    ratios = [x.budget_ratio for x in s]
    assert ratios[-1] == pytest.approx(0.2) and ratios[0] < schedule.START_RATIO
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    assert ratios[1] / ratios[0] == pytest.approx(ratios[3] / ratios[2])
    eps = [x.eps for x in schedule.stage_settings(Settings(eps=0.2), "progressive", 3, ("h", 2))]
    assert eps[-1] == pytest.approx(0.2) and all(a < b for a, b in zip(eps, eps[1:]))


def test_layerwise_groups_grow_front_to_back_to_every_block():
    s = schedule.stage_settings(Settings(budget_ratio=0.3), "layerwise", 3, ("model.layers", 7))
    assert [len(x.include) for x in s] == [2, 5, 7]
    assert s[-1].include == tuple(f"model.layers.{i}.*" for i in range(7))
    assert {x.budget_ratio for x in s} == {0.3}
    assert schedule.stage_settings(Settings(), "single", 0, ("h", 1)) == [Settings()]


@pytest.mark.parametrize("how", [["--schedule", "progressive", "--stages", "2"],
                                 ["--schedule", "layerwise", "--groups", "2"],
                                 ["--finetune-steps", "5", "--finetune-codes",
                                  "--finetune-embedding"]])
def test_every_schedule_ends_at_the_requested_budget(models, calib_file, tmp_path, how):
    r = compress(models["gpt2"], tmp_path / "single", calib_file, "--ratio", "0.3")
    assert r.exit_code == 0, r.output
    single = json.loads(r.stdout)
    r = compress(models["gpt2"], tmp_path / "out", calib_file, "--ratio", "0.3",
                 "--finetune-steps", "5", *how)
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["budget"]["requested_bytes"] == single["budget"]["requested_bytes"]
    assert got["budget"]["achieved_bytes"] <= got["budget"]["requested_bytes"]
    manifest = svdq.artifact.read(tmp_path / "out")
    assert manifest["source"]["id"] == str(models["gpt2"])  # the original, not a stage's
    stages = manifest["schedule"]["stages"]
    assert len(stages) == (1 if how[0] == "--finetune-steps" else 2)
    assert len(manifest["recovery"]) == 1 and all("val_loss_after" in s for s in stages)
    context = json.loads((Path(models["gpt2"]) / "config.json").read_text())["n_positions"]
    assert manifest["recovery"][0]["options"]["seq_len"] == min(256, context)  # a causal LM's
    codes = "--finetune-codes" in how
    assert manifest["recovery"][0]["options"]["train_codes"] == codes
    assert manifest["recovery"][0]["options"]["codes_lr"] == (ft.CODES_LR if codes else None)
    assert manifest["recovery"][0]["options"]["train_embedding"] == codes  # (given together)
    svdq.load(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "schedule" in card and "fine-tuned" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "single"]  # no work folders


def test_layerwise_without_fine_tuning_compresses_only_its_groups_blocks_first(models,
                                                                              calib_file,
                                                                              tmp_path):
    r = compress(models["llama"], tmp_path / "out", calib_file, "--eps", "0.3", "--schedule",
                 "layerwise", "--groups", "2")
    assert r.exit_code == 0, r.output
    manifest = svdq.artifact.read(tmp_path / "out")
    assert [len(s["include"]) for s in manifest["schedule"]["stages"]] == [1, 2]
    assert "recovery" not in manifest
    names = {p["name"] for p in manifest["layers"]}
    assert any(".layers.1." in n for n in names)  # the last stage covers every block


def test_bad_schedules_get_one_line(models, calib_file, tmp_path):
    m = models["gpt2"]
    cases = {("--schedule", "zigzag"): "--schedule",
             ("--schedule", "progressive", "--stages", "0", "--ratio", "0.3"): "--stages",
             ("--schedule", "progressive", "--size", "1MB"): "--size",
             ("--schedule", "layerwise", "--include", "*.mlp.*"): "--exclude",
             ("--finetune-steps", "-1"): "--finetune-steps",
             ("--finetune-codes",): "--finetune-steps",
             ("--finetune-embedding",): "--finetune-steps",
             ("--finetune-steps", "3", "--finetune-embedding", "--embed-bits", "8"):
                 "--embed-bits",
             ("--finetune-steps", "3", "--finetune-lr", "0"): "--lr",
             ("--finetune-steps", "3", "--finetune-seq-len", "0"): "--seq-len",
             ("--finetune-steps", "3", "--finetune-seq-len", "100000", "--ratio", "0.3"):
                 "--finetune-seq-len 100000",
             ("--schedule", "layerwise", "--groups", "9", "--eps", "0.3"): "more than"}
    for extra, word in cases.items():
        assert word in one_line_error(compress(m, tmp_path / "o", calib_file, *extra)), extra
    assert not (tmp_path / "o").exists()


def test_ctrl_c_between_stages_leaves_nothing(models, calib_file, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "finetune", interrupted)
    r = compress(models["gpt2"], tmp_path / "o", calib_file, "--ratio", "0.3", "--schedule",
                 "progressive", "--stages", "2", "--finetune-steps", "3")
    assert "interrupted" in one_line_error(r)
    assert list(tmp_path.iterdir()) == []


def test_finetune_help_states_the_codes_default_the_library_uses():
    # the CLI keeps torch-heavy modules out of its start, so its help carries the number as text
    text = " ".join(CliRunner().invoke(app, ["finetune", "--help"],
                                       env={"COLUMNS": "200"}).stdout.split())
    assert f"(default {ft.CODES_LR})" in text


@pytest.mark.parametrize("arch,how", [("llama", ["--schedule", "progressive", "--stages", "2",
                                                 "--finetune-steps", "3"]),
                                      ("gpt2", ["--schedule", "layerwise", "--groups", "2"])])
def test_a_streamed_schedule_equals_one_loaded_whole(models, calib_file, tmp_path, monkeypatch,
                                                     arch, how):
    """Every stage reads its source block by block (the first the original, the next the stage
    before, exported), the teacher is read whole; the artifact is the one `--no-stream` makes."""
    import torch

    from svdq import runtime
    from svdq.models import load

    streamed = []
    real = load.load_source
    monkeypatch.setattr(load, "load_source", lambda *a, **k: streamed.append(
        k.get("stream", False)) or real(*a, **k))
    for name, extra in (("streamed", []), ("whole", ["--no-stream"])):
        r = compress(models[arch], tmp_path / name, calib_file, "--ratio", "0.4", *how, *extra)
        assert r.exit_code == 0, r.output
    tuned = "--finetune-steps" in how
    # streamed: the original, the teacher (whole) where it fine-tunes, the second stage's source
    assert streamed[:3 if tuned else 2] == ([True, False, True] if tuned else [True, True])
    assert not any(streamed[3 if tuned else 2:])
    a, b = (runtime.load_tensors(tmp_path / n, runtime.read_manifest(tmp_path / n))
            for n in ("streamed", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert svdq.artifact.read(tmp_path / "streamed")["layers"] == \
        svdq.artifact.read(tmp_path / "whole")["layers"]
