"""--sequential: each block is calibrated on what the compressed blocks before it produce."""
from __future__ import annotations

import pytest
import torch

from svdq.calibration import text as calibrate
from svdq.calibration.collect import collect
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.models import load as hf
from svdq.pipeline import compress as pipeline


def grams_seen(models, calib_file, sequential: bool, monkeypatch):
    """Run compress and keep each layer's Gram as the walk measured it."""
    source = hf.load_source(str(models["llama"]))
    settings = Settings(eps=0.5, bits=4, calib=str(calib_file), calib_samples=4, calib_len=32,
                        sequential=sequential)
    grams, real = {}, pipeline.choose_form

    def spy(work, s):
        grams[work.name] = work.stats.gram.clone()
        return real(work, s)
    monkeypatch.setattr(pipeline, "choose_form", spy)
    pipeline.compress(source, settings)
    return source, settings, grams


def block1_gram(model, tokenizer, calib_file, settings):
    """The Gram of block 1's q_proj inputs when `model` runs on the calibration batches."""
    ids, _ = calibrate.calibration_ids(model, tokenizer, settings.calib, settings.calib_samples,
                                       settings.calib_len, settings.batch_size, settings.seed, True)
    layer = model.get_submodule("model.layers.1.self_attn.q_proj")
    with collect({"q": layer}) as stats, torch.no_grad():
        for i in range(0, ids.shape[0], settings.batch_size):
            batch = ids[i: i + settings.batch_size]
            model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    return stats["q"].gram


def test_sequential_calibrates_on_the_compressed_outputs(models, calib_file, monkeypatch):
    source, settings, grams = grams_seen(models, calib_file, True, monkeypatch)
    # source.model now holds every block compressed; block 1's inputs depend on block 0 only
    expected = block1_gram(source.model, source.tokenizer, calib_file, settings)
    assert torch.allclose(grams["model.layers.1.self_attn.q_proj"], expected, rtol=1e-6, atol=1e-6)


def test_default_calibrates_on_the_original_outputs(models, calib_file, monkeypatch):
    source, settings, grams = grams_seen(models, calib_file, False, monkeypatch)
    original = hf.load_source(str(models["llama"]))
    expected = block1_gram(original.model, original.tokenizer, calib_file, settings)
    compressed = block1_gram(source.model, source.tokenizer, calib_file, settings)
    seen = grams["model.layers.1.self_attn.q_proj"]
    assert torch.allclose(seen, expected, rtol=1e-6, atol=1e-6)
    # the two streams really differ here, so the test above could tell them apart
    assert not torch.allclose(compressed, expected, rtol=1e-3, atol=1e-3)


def test_sweep_refuses_sequential(models, calib_file):
    from svdq import sweep

    source = hf.load_source(str(models["llama"]))
    with pytest.raises(SvdqError, match="sequential"):
        sweep.run(source, Settings(sequential=True, calib=str(calib_file)), [0.1], [8],
                  lambda m: {"quality": 0.0}, sweep.Metric("perplexity", True))
