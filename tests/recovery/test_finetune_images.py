"""`svdq finetune` and the compress schedules on image classifiers: distilled on the KL of the
class distributions over training images, held-out images for validation; convolutions train
their scales like linear layers; the stored form and bytes stay."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import svdq
from svdq import runtime
from svdq.cli import app
from svdq.evaluate import load_baseline
from svdq.recovery import finetune as ft, tuned
from conftest import one_line_error

FAST = ["--calib-samples", "12", "--batch-size", "4"]
TUNE = ["--steps", "20", "--eval-every", "5", "--lr", "1e-2", "--batch-size", "4"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def artifacts(vision_models, image_folder, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft-images")
    for arch, eps in (("resnet", "0.3"), ("vit", "0.7")):  # the tiny ViT is robust: squeeze it
        r = run("compress", vision_models[arch], "-o", root / arch, "--calib", image_folder,
                "--eps", eps, "--bits", "4", *FAST)
        assert r.exit_code == 0, r.output
    return {arch: root / arch for arch in ("resnet", "vit")}


def stored(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_tuned_convolutions_compute_what_the_loader_does(artifacts):
    manifest = json.loads((artifacts["resnet"] / runtime.MANIFEST).read_text())
    assert any(p["kind"] == "lowrank" for p in manifest["layers"])  # a rank-k conv is tuned too
    x = pixels()
    with torch.no_grad():
        expected = svdq.load(artifacts["resnet"])(pixel_values=x).logits
        student = svdq.load(artifacts["resnet"], dtype="float32")
        tuned.prepare(student, manifest)
        layers = [m for m in student.modules() if isinstance(m, tuned.TunedLinear)]
        assert layers and all(m.conv is not None for m in layers)
        for m in layers:
            m.qat = False
        got = student(pixel_values=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_finetune_on_images_keeps_the_form_and_lowers_the_held_out_kl(arch, artifacts,
                                                                      image_folder, tmp_path):
    r = run("finetune", artifacts[arch], "-o", tmp_path / "ft", "--calib", image_folder,
            *TUNE, "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record["loss"] == "kl_class" and record["text"]["kind"] == "images"
    assert record["text"]["val_images"] == 8 and record["text"]["train_images"] == 10
    assert record["val_loss_after"] < record["val_loss_before"], record
    old, new = stored(artifacts[arch]), stored(tmp_path / "ft")
    assert old.keys() == new.keys()
    for k in old:
        assert (old[k].shape, old[k].dtype) == (new[k].shape, new[k].dtype), k
        if k.endswith((".codes", ".zeros")):
            assert torch.equal(old[k], new[k]), k  # the codes stay
    m_old = json.loads((artifacts[arch] / runtime.MANIFEST).read_text())
    m_new = json.loads((tmp_path / "ft" / runtime.MANIFEST).read_text())
    assert m_new["layers"] == m_old["layers"] and m_new["totals"] == m_old["totals"]
    # both loaders agree, and the recorded loss is that of the artifact as written
    spec = importlib.util.spec_from_file_location(f"loader_{arch}", tmp_path / "ft" / "svdq_loader.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    x = pixels()
    student = svdq.load(tmp_path / "ft", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(svdq.load(tmp_path / "ft")(pixel_values=x).logits,
                                   loader.load(tmp_path / "ft")(pixel_values=x).logits)
    teacher = load_baseline(m_new).model.float().eval()
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "ft"))
    _, val, _ = ft.data.pictures(processor, str(image_folder), 512, 8, 0, 1)
    got = ft._val_loss(student, teacher, val, 4, False)
    assert got == pytest.approx(record["val_loss_after"], rel=1e-3)


def test_image_and_text_inputs_are_not_mixed_up(artifacts, models, calib_file, image_folder,
                                                tmp_path):
    line = one_line_error(run("finetune", artifacts["vit"], "-o", tmp_path / "a", "--calib",
                              calib_file))
    assert "folder of PNG or JPEG images" in line
    line = one_line_error(run("finetune", artifacts["vit"], "-o", tmp_path / "a", "--calib",
                              image_folder, "--ce-weight", "0.5"))
    assert "image model" in line and "--ce-weight" in line
    r = run("compress", models["gpt2"], "-o", tmp_path / "lm", "--calib", calib_file,
            "--calib-samples", "4", "--calib-len", "32", "--eps", "0.3")
    assert r.exit_code == 0, r.output
    line = one_line_error(run("finetune", tmp_path / "lm", "-o", tmp_path / "b", "--calib",
                              image_folder))
    assert "text file" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_layerwise_schedule_with_fine_tuning_on_images(vision_models, image_folder, tmp_path):
    r = run("compress", vision_models["resnet"], "-o", tmp_path / "out", "--calib", image_folder,
            "--eps", "0.3", "--bits", "4", *FAST, "--schedule", "layerwise", "--groups", "2",
            "--finetune-steps", "5", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "out" / runtime.MANIFEST).read_text())
    stages = manifest["schedule"]["stages"]
    assert len(stages) == 2 and all("val_loss_after" in s for s in stages)
    assert manifest["recovery"][-1]["loss"] == "kl_class"
    with torch.no_grad():
        assert svdq.load(tmp_path / "out")(pixel_values=pixels()).logits.shape == (3, 3)
