"""Layers of the head after the blocks (`--include`): a classifier, an untied lm_head, a
pooler. Their statistics are those of the inputs the model's own head gives them; they take
part in every mode; what runs before the blocks, or is tied to another weight, is refused."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers
from typer.testing import CliRunner

from conftest import make_tokenizer, one_line_error, tiny_config
from svdq import artifact, runtime
from svdq.cli import app
from svdq.config import Settings
from svdq.models import load as hf
from svdq.pipeline.compress import compress
from svdq.pipeline.inputs import calibration_ids
from svdq.pipeline.analyse import analyse
from svdq.pipeline.work import Clock

BLOCKS_AND_HEAD = ["--include", "resnet.encoder.*", "--include", "classifier.*"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("untied") / "llama"
    tok = make_tokenizer(folder)
    config = tiny_config("llama", len(tok))
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_head_statistics_are_those_of_its_inputs(untied_llama, calib_file):
    source = hf.load_source(str(untied_llama), stream=False)
    settings = Settings(include=("model.layers.*", "lm_head"), calib=str(calib_file),
                        calib_samples=4, calib_len=32, batch_size=4)
    ids = calibration_ids(source, settings, lambda *a: None, {})
    works = analyse(source, settings, ids, lambda *a: None, Clock(), gradients=True)
    assert works[-1].name == "lm_head"
    seen = []
    hook = source.model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        source.model(input_ids=ids)
    hook.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()
    stats = works[-1].stats
    assert stats.tokens == x.shape[0]
    assert float((stats.gram - x.T @ x).norm() / (x.T @ x).norm()) < 1e-5
    assert stats.grad2 > 0  # its sensitivity comes from the head's own backward


def test_untied_lm_head_in_eps_and_budget_modes(untied_llama, calib_file, tmp_path):
    for mode in (["--eps", "0.3"], ["--ratio", "0.5"]):
        out = tmp_path / mode[0].strip("-")
        r = run("compress", untied_llama, "-o", out, "--calib", calib_file, "--calib-samples", "4",
                "--calib-len", "32", "--include", "model.layers.*", "--include", "lm_head", *mode)
        assert r.exit_code == 0, r.output
        layers = artifact.read(out)["layers"]
        assert layers[-1]["name"] == "lm_head" and layers[-1]["kind"] != "keep"
        model = runtime.load(out)
        assert isinstance(model.lm_head, runtime.StoredLinear)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()


@pytest.mark.parametrize("mode", [["--eps", "0.2"], ["--ratio", "0.4"], ["--eps", "0.2", "--method", "fisher"]])
def test_classifier_head_of_an_image_model(mode, vision_models, image_folder, tmp_path):
    source = hf.load_source(str(vision_models["resnet"]))
    settings = Settings(calib=str(image_folder), calib_samples=12, batch_size=4,
                        include=("resnet.encoder.*", "classifier.*"),
                        **({"eps": float(mode[1])} if mode[0] == "--eps" else
                           {"budget_ratio": float(mode[1])}),
                        **({"method": "fisher"} if "fisher" in mode else {}))
    result = compress(source, settings)
    manifest = artifact.save(tmp_path / "out", source, result, settings)
    assert manifest["layers"][-1]["name"] == "classifier.1"
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    spec = importlib.util.spec_from_file_location("loader", tmp_path / "out" / "svdq_loader.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    with torch.no_grad():
        expected = result.model(pixel_values=x).logits
        for model in (runtime.load(tmp_path / "out"), loader.load(tmp_path / "out")):
            torch.testing.assert_close(model(pixel_values=x).logits, expected, rtol=1e-4, atol=1e-5)


def test_head_layers_that_cannot_be_compressed_are_refused(models, vision_models, image_folder,
                                                           calib_file, tmp_path):
    err = one_line_error(run("compress", vision_models["vit"], "-o", tmp_path / "a", "--calib",
                             image_folder, "--calib-samples", "12", "--include",
                             "vit.embeddings.*"))
    assert "runs before the blocks" in err
    err = one_line_error(run("compress", models["gpt2"], "-o", tmp_path / "b", "--calib",
                             calib_file, "--calib-len", "16", "--include", "lm_head"))
    assert "tied to transformer.wte" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
