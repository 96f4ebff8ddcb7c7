"""Image classifiers (ViT, ResNet, ConvNeXt) through the pipeline: their target layers,
convolutions factorized to their rank, every loader giving the compressed model's logits, the
methods and budgets, and the refusals when model and calibration data do not fit together."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers
from typer.testing import CliRunner

from conftest import VISION, one_line_error
from svdq import artifact, runtime
from svdq.cli import app
from svdq.config import Settings
from svdq.models import load as hf
from svdq.models.layers import blocks_of, targets
from svdq.pipeline.compress import compress

FAST = ["--calib-samples", "12", "--batch-size", "4"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_blocks_and_targets(vision_models):
    expected = {"vit": ("vit.layers", 12), "resnet": ("resnet.encoder.stages", 5),
                "convnext": ("convnext.encoder.stages", 5)}
    for arch, (prefix, n) in expected.items():
        model = hf.load_source(str(vision_models[arch])).model
        names = targets(model)
        assert blocks_of(model)[0] == prefix and len(names) == n, (arch, names)
        assert not any("dwconv" in n for n in names)  # depthwise: kept, never factorized
        assert not any(n.startswith("classifier") or "embed" in n for n in names)


@pytest.mark.parametrize("arch", VISION)
def test_compressed_model_and_every_loader_agree(arch, vision_models, image_folder, tmp_path):
    source = hf.load_source(str(vision_models[arch]))
    settings = Settings(eps=0.05, bits=8, calib=str(image_folder), calib_samples=12, batch_size=4)
    result = compress(source, settings)
    manifest = artifact.save(tmp_path / "out", source, result, settings)
    kinds = {p["kind"] for p in manifest["layers"]}
    assert "lowrank" in kinds and kinds & {"dense", "residual"}, kinds  # planted rank 3 pays
    assert manifest["calibration"]["kind"] == "images"
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    x = pixels()
    with torch.no_grad():
        expected = result.model(pixel_values=x).logits
        stored = runtime.load(tmp_path / "out")(pixel_values=x).logits
        dense = runtime.load(tmp_path / "out", dequantize=True)(pixel_values=x).logits
        spec = importlib.util.spec_from_file_location("loader", tmp_path / "out" / "svdq_loader.py")
        loader = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loader)
        standalone = loader.load(tmp_path / "out")(pixel_values=x).logits
        auto = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out")
        hub = auto.eval()(pixel_values=x).logits  # transformers' own loading, svdq quantizer
    for got in (stored, dense, standalone, hub):
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    if arch == "resnet":
        model = runtime.load(tmp_path / "out", dequantize=True)
        assert any(isinstance(m, runtime.LowRankConv2d) for m in model.modules())


def test_conv_of_exact_rank_compresses_to_that_rank(vision_models, image_folder, tmp_path):
    r = run("compress", vision_models["resnet"], "-o", tmp_path / "out", "--calib", image_folder,
            *FAST, "--eps", "0.01", "--bits", "16", "--no-gptq")
    assert r.exit_code == 0, r.output
    layers = artifact.read(tmp_path / "out")["layers"]
    planted = [p for i, p in enumerate(layers) if i % 2 == 0 and p["k_break"] > 3]
    assert planted and all(p["kind"] == "lowrank" and p["rank"] == 3 for p in planted), layers


@pytest.mark.parametrize("options", [["--ratio", "0.4"], ["--eps", "0.1", "--method", "fisher"],
                                     ["--eps", "0.1", "--method", "asvd", "--sequential",
                                      "--refit"],
                                     ["--eps", "0.1", "--residual", "--bits", "4"]])
def test_methods_and_budgets(options, vision_models, image_folder, tmp_path):
    r = run("compress", vision_models["resnet"], "-o", tmp_path / "out", "--calib", image_folder,
            *FAST, *options, "--json")
    assert r.exit_code == 0, r.output
    manifest = artifact.read(tmp_path / "out")
    if "--ratio" in options:
        fp16 = sum(p["fp16_bytes"] for p in manifest["layers"])
        assert sum(p["bytes"] for p in manifest["layers"]) <= 0.4 * fp16
        assert manifest["budget"]["candidates"]  # judged by the KL to the source's classes
    model = runtime.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=pixels()).logits).all()


def test_model_and_data_that_do_not_fit_are_refused(vision_models, models, image_folder,
                                                    calib_file, tmp_path):
    err = one_line_error(run("compress", vision_models["vit"], "-o", tmp_path / "a",
                             "--calib", calib_file))
    assert "is an image model: give --calib DIR" in err
    err = one_line_error(run("compress", models["gpt2"], "-o", tmp_path / "b", "--calib",
                             image_folder, "--calib-len", "16"))
    assert "is a folder of images but GPT2LMHeadModel takes text" in err
    err = one_line_error(run("compress", vision_models["vit"], "-o", tmp_path / "c"))
    assert "image model" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = one_line_error(run("compress", vision_models["vit"], "-o", tmp_path / "d",
                             "--calib", empty))
    assert "holds no PNG or JPEG images" in err
    # a schedule fine-tunes an image model on the images (tests/recovery/test_finetune_images.py)
    err = one_line_error(run("compress", models["gpt2"], "-o", tmp_path / "e", "--calib",
                             image_folder, "--finetune-steps", "5"))
    assert "takes text" in err
    assert not any((tmp_path / x).exists() for x in "abcde")
