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


# ---------------------------------------------------------------- budgets (--ratio/--size)
Q1 = "model.layers.1.self_attn.q_proj"


def budget_grams(models, calib_file, monkeypatch, sequential: bool, **extra):
    """Compress on a budget; keep, per candidate plan, the Gram each layer was built on and
    the modules its block 0 became."""
    from svdq.pipeline import two_pass

    source = hf.load_source(str(models["llama"]))
    settings = Settings(budget_ratio=0.3, calib=str(calib_file), calib_samples=4, calib_len=32,
                        batch_size=4, sequential=sequential, **extra)
    grams, block0, real = {}, {}, two_pass._layer_of_each

    def spy(work, picks, *args, **kwargs):
        each = real(work, picks, *args, **kwargs)
        for label, (_, _, module, _) in each.items():
            grams[label, work.name] = work.stats.gram.clone()
            if work.name.startswith("model.layers.0.") and module is not None:
                block0.setdefault(label, {})[work.name] = module
        return each
    monkeypatch.setattr(two_pass, "_layer_of_each", spy)
    result = pipeline.compress(source, settings)
    labels = {label for label, _ in grams}
    assert len(labels) > 1, "the budget judged one plan: nothing here tells the streams apart"
    return source, settings, grams, block0, labels, result


def test_sequential_budget_builds_each_plan_on_its_own_stream(models, calib_file, monkeypatch):
    source, settings, grams, block0, labels, result = budget_grams(models, calib_file,
                                                                   monkeypatch, True)
    original = hf.load_source(str(models["llama"]))
    plain = block1_gram(original.model, original.tokenizer, calib_file, settings)
    for label in labels:  # block 1 of each plan saw what that plan's block 0 produces
        from svdq.pipeline.work import swapped

        with swapped(original.model, block0[label]):
            own = block1_gram(original.model, original.tokenizer, calib_file, settings)
        assert torch.allclose(grams[label, Q1], own, rtol=1e-5, atol=1e-5), label
        assert not torch.allclose(grams[label, Q1], plain, rtol=1e-3, atol=1e-3), label
        # block 0 has no compressed blocks before it: the source's inputs
        first = grams[label, "model.layers.0.self_attn.q_proj"]
        assert torch.allclose(first, grams[next(iter(labels)), "model.layers.0.self_attn.q_proj"])
    # the model holds the winner; its block 1 saw the winner's block 0
    winner = block1_gram(source.model, source.tokenizer, calib_file, settings)
    assert torch.allclose(grams[result.budget["plan"], Q1], winner, rtol=1e-5, atol=1e-5)
    assert sum(p["bytes"] for p in result.layers) <= result.budget["requested_bytes"]


def test_budget_without_sequential_builds_every_plan_on_the_source_stream(models, calib_file,
                                                                          monkeypatch):
    _, settings, grams, _, labels, _ = budget_grams(models, calib_file, monkeypatch, False)
    original = hf.load_source(str(models["llama"]))
    plain = block1_gram(original.model, original.tokenizer, calib_file, settings)
    for label in labels:
        assert torch.allclose(grams[label, Q1], plain, rtol=1e-5, atol=1e-5), label


@pytest.mark.parametrize("arch,extra", [("llama", []), ("llama", ["--refit"]), ("bert", [])],
                         ids=["sequential", "sequential-refit", "encoder"])
def test_cli_sequential_budget_streams_and_loads(models, calib_file, tmp_path, monkeypatch,
                                                 arch, extra):
    """The CLI streams the source block by block (each block read once per pass however many
    plans calibrate on it); the artifact meets the budget and loads strictly. The main (source)
    stream is carried only where something reads it: an encoder's judge, --refit's pairing."""
    import json

    from typer.testing import CliRunner

    import svdq
    from svdq.cli import app
    from svdq.pipeline.walk import Walker

    kept, start = [], Walker.start

    def spy(self, ids, variants=(), main=True, **kw):
        start(self, ids, variants, main, **kw)
        if variants:
            kept.append(self.main is not None)
    monkeypatch.setattr(Walker, "start", spy)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["compress", str(models[arch]), "-o", str(out), "--ratio", "0.3",
                                 "--sequential", *extra, "--calib", str(calib_file),
                                 "--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    assert kept == [arch == "bert" or bool(extra)]
    manifest = json.loads((out / "svdq.json").read_text())
    assert manifest["settings"]["_data"]["sequential"] is True
    assert manifest["totals"]["target_bytes"] <= manifest["budget"]["requested_bytes"]
    assert len(manifest["budget"]["candidates"]) > 1
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        model = svdq.load(out)
        result = model(input_ids=ids)
    states = result.logits if arch != "bert" else result.last_hidden_state
    assert torch.isfinite(states).all()
