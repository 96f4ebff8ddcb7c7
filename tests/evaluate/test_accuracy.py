"""Image accuracy: the scores' arithmetic, `svdq eval --accuracy` on an artifact and a model,
`svdq sweep --accuracy`, and the refusals."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error
from svdq.cli import app
from svdq.evaluate.accuracy import scores


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_scores():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 5.0], [1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 2])
    s = scores(logits, labels)
    assert s["top1"] == 0.5 and s["top5_k"] == 3 and s["top5"] == 1.0 and "kl" not in s
    two = scores(logits[:, :2], labels.clamp(max=1))
    assert two["top5_k"] == 2 and two["top5"] == 1.0
    ref = logits.clone()
    ref[1] = torch.tensor([0.0, 9.0, 0.0])
    s = scores(logits, labels, ref)
    assert s["agreement"] == 0.75
    p, q = torch.softmax(ref[1].double(), 0), torch.softmax(logits[1].double(), 0)
    assert s["kl"] == pytest.approx(float((p * (p / q).log()).sum()) / 4)
    assert scores(logits, labels, logits)["kl"] == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def vit_artifact(vision_models, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("acc") / "vit"
    r = run("compress", vision_models["vit"], "-o", out, "--calib", image_folder,
            "--calib-samples", "8", "--eps", "0.05")
    assert r.exit_code == 0, r.output
    return out


def test_eval_accuracy_of_an_artifact_and_its_source(vit_artifact, image_folder):
    r = run("eval", vit_artifact, "--accuracy", image_folder, "--baseline", "--json")
    assert r.exit_code == 0, r.output
    acc = json.loads(r.stdout)["accuracy"]
    assert acc["images"] == 18 and acc["classes"] == 3
    art, base = acc["rows"]
    assert art["name"] == "artifact" and base["name"] == "baseline"
    assert 0 <= art["top1"] <= art["top5"] == 1.0 and 0 <= art["agreement"] <= 1
    assert math.isfinite(art["kl"]) and art["kl"] >= 0 and "agreement" not in base
    r = run("eval", vit_artifact, "--accuracy", image_folder)
    assert r.exit_code == 0 and "agreement" in r.stdout and "baseline" not in r.stdout


def test_eval_accuracy_of_a_plain_model(vision_models, image_folder):
    r = run("eval", vision_models["resnet"], "--accuracy", image_folder, "--json")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)["accuracy"]["rows"]
    assert row["name"] == "model" and "agreement" not in row


def test_accuracy_refusals(vision_models, models, image_folder, tmp_path):
    err = one_line_error(run("eval", models["bert"], "--accuracy", image_folder))
    assert "measures image classifiers" in err
    err = one_line_error(run("eval", vision_models["vit"], "--accuracy", tmp_path))
    assert "one sub-folder of images per class" in err
    (tmp_path / "hat").mkdir()
    (tmp_path / "hat" / "0.png").write_bytes((image_folder / "bag" / "0.png").read_bytes())
    err = one_line_error(run("eval", vision_models["vit"], "--accuracy", tmp_path))
    assert "'hat' names no class" in err


def test_sweep_accuracy(vision_models, image_folder, tmp_path):
    r = run("sweep", vision_models["resnet"], "-o", tmp_path / "res", "--calib", image_folder,
            "--calib-samples", "8", "--accuracy", image_folder, "--eps", "0.1", "--bits", "8",
            "--ratio", "0.5", "--no-plot", "--json")
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)
    assert results["metric"] == "top-1 accuracy"
    labels = {row["method"] for row in results["rows"]}
    assert {"source", "fp16", "bnb-8bit", "whiten", "whiten budget"} <= labels
    assert all(0 <= row["quality"] <= 1 for row in results["rows"])
