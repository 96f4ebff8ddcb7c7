"""`--fast` (svdq/pipeline/fast.py): a budget's quicker plan search — gradients and the judge
on some of the sequences, the bases nearest the budget's bits, three candidates, one round of
the alternation — still within the budget, still judged, refused without a budget."""
from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from svdq import runtime
from svdq.algo import residual
from svdq.cli import app
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.models import blocks as model_blocks
from svdq.models.streams import Stream
from svdq.pipeline import budget as budgets, fast, judge, two_pass
from svdq.pipeline.options import bases

SMALL = ["--calib-samples", "16", "--calib-len", "32", "--batch-size", "2"]


def run(model, out, calib, *extra):
    return CliRunner().invoke(app, ["compress", str(model), "-o", str(out), "--calib",
                                    str(calib), *SMALL, *map(str, extra)])


def test_fast_needs_a_budget(models, calib_file, tmp_path):
    r = run(models["llama"], tmp_path / "out", calib_file, "--eps", "0.1", "--fast")
    assert r.exit_code != 0 and "--fast" in r.output and "--ratio" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()
    with pytest.raises(SvdqError, match="--ratio or --size"):
        Settings(fast=True)


def test_samples_take_a_share_at_least_a_few():
    assert [fast.samples(n) for n in (1, 3, 4, 16, 32, 33, 64)] == [1, 3, 4, 4, 4, 5, 8]
    assert [fast.samples(n, fast.GRADIENT_SHARE, fast.GRADIENT_LEAST)
            for n in (1, 3, 16, 32, 33, 64)] == [1, 2, 2, 2, 3, 4]


@pytest.mark.parametrize("ratio", [0.143, 0.206, 0.27, 0.5])
def test_the_bases_are_the_nearest_few_of_the_default_ones(ratio):
    average = (16 * ratio,) * 2
    quick = bases(Settings(budget_ratio=ratio, fast=True), average)
    every = bases(Settings(budget_ratio=ratio))
    assert len(quick) == fast.BASES and set(quick) <= set(every)
    offered = [c for c in bases(Settings(budget_ratio=ratio)) if c != (4, 128, "int")]
    assert (4, 128, "int") not in quick  # NF4 in 256 dominates it
    far = lambda c: abs(math.log(runtime_bits(*c) / average[0]))  # noqa: E731
    assert max(map(far, quick)) <= min(far(c) for c in offered if c not in quick) + 1e-12
    if ratio == 0.27:  # GPTQ w4 g64's bytes
        assert quick == [(4, 64, "int"), (4, 256, "bnb")]


def runtime_bits(b, block, grid):
    from svdq.algo.quant import weight_bytes
    return weight_bytes(4096, 4096, b, block, grid) * 8 / 4096 ** 2


def test_the_judge_scores_only_the_rows_it_is_given(models):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    ids = torch.randint(3, 60, (6, 12))
    with torch.no_grad():
        captured = model_blocks.capture(model, ids, 2)
    stream = Stream(torch.device("cpu"))
    for b, h in enumerate(captured.hidden):
        for i, block in enumerate(model.model.layers):
            h = model_blocks.run_block(block, h, captured.kwargs[i][b])
        stream.append(h)
    head = Stream(torch.device("cpu"))
    for h in list(stream)[:2]:
        head.append(h)
    some = judge.losses(model, {"a": stream}, ids[:4], True)["a"]
    assert some == pytest.approx(judge.losses(model, {"a": head}, ids[:4], True)["a"], rel=1e-6)
    with torch.no_grad():
        want = model(ids[:4], labels=ids[:4]).loss.item()
    assert some == pytest.approx(want, rel=1e-4)
    assert judge.losses(model, {"a": stream}, ids, True)["a"] != pytest.approx(some, rel=1e-6)


@pytest.mark.parametrize("arch,ratio,extra", [("llama", 0.3, ()), ("bert", 0.4, ()),
                                              ("llama", 0.3, ("--sequential",)),
                                              ("llama", 0.3, ("--batch-size", "3"))])
def test_a_fast_budget_is_judged_on_a_share_within_its_bytes(models, calib_file, tmp_path,
                                                             monkeypatch, arch, ratio, extra):
    rounds, grads, scored, dtypes = [], [], [], []
    real_factorize = residual.factorize  # every base's error: decomposed in float32
    monkeypatch.setattr(residual, "factorize", lambda m, w, st, dtype=torch.float64, rank=None:
                        dtypes.append(dtype) or real_factorize(m, w, st, dtype, rank))
    from svdq.algo import error
    forms = []  # every trace form's Gram: float32 under --fast (error.products_in)
    real_form = error.trace_form
    monkeypatch.setattr(error, "trace_form", lambda a, gram: forms.append(gram.dtype)
                        or real_form(a, gram))
    refine = residual.refine_residuals
    monkeypatch.setattr(two_pass, "refine_residuals",
                        lambda *a, **k: rounds.append(a[5]) or refine(*a, **k))
    real_grads = two_pass.Walker.gradients
    monkeypatch.setattr(two_pass.Walker, "gradients", lambda self, ids, **k: grads.append(
        (len(ids), k["scale"])) or real_grads(self, ids, **k))
    real_losses = two_pass.losses
    monkeypatch.setattr(two_pass, "native_bf16", lambda device: True)
    monkeypatch.setattr(two_pass, "losses", lambda model, finals, ids, *a, **k: scored.append(
        (ids.shape[0], [sum(h.shape[0] for h in s) for s in finals.values()], k["bf16"]))
        or real_losses(model, finals, ids, *a, **k))
    r = run(models[arch], tmp_path / "out", calib_file, "--ratio", ratio, "--fast", "--json",
            *extra)
    assert r.exit_code == 0, r.output
    manifest = runtime.read_manifest(tmp_path / "out")
    info = manifest["budget"]
    assert info["fast"]["gradient_samples"] == 2 and grads == [(2, 8.0)]
    assert rounds and set(rounds) == {fast.ROUNDS}
    assert dtypes and set(dtypes) == {torch.float32}
    assert forms and set(forms) == {torch.float32}
    assert 2 <= len(info["candidates"]) <= 3
    # a --sequential budget's streams calibrate its candidates: they carry every sequence,
    # the head scores the first four; otherwise they carry just those four (with batches of
    # 3 too: pass 2 captures them on their own)
    carried = 16 if "--sequential" in extra else 4
    assert info["fast"]["judged_samples"] == 4
    assert scored == [(4, [carried] * len(info["candidates"]), True)]  # where bf16 is native
    assert all(c["calibration_loss"] is not None for c in info["candidates"])
    assert info["achieved_bytes"] <= info["requested_bytes"]
    allowed = {tuple(b) for b in info["fast"]["bases"]}
    for layer in manifest["layers"]:
        if layer["kind"] == "residual" or layer["kind"] == "dense" and layer.get("grid") == "int":
            assert (layer["bits"], layer["block_size"], layer.get("grid") or "bnb") in allowed
    model = runtime.load(tmp_path / "out")
    with torch.no_grad():
        out = model(torch.randint(3, 60, (1, 12)))
    hidden = out.logits if arch == "llama" else out.last_hidden_state
    assert torch.isfinite(hidden).all()


def test_fast_candidates_are_the_default_ones_it_keeps(models, calib_file):
    from test_judge import analysed
    _, settings, _, _, measured = analysed(models, calib_file, ratio=0.6)
    limit = math.floor(0.3 * measured.fp16)
    full = budgets.candidates(measured, limit, settings.block_size)
    few = budgets.candidates(measured, limit, settings.block_size, few=True)
    assert few[0] == full[0] and len(few) <= 3
    assert all(c in full for c in few)
    assert not any("on every layer" in label for label, _ in few)
    assert any("no correction" in label for label, _ in few)


def test_fast_options_skip_low_rank_alone_and_bnb_in_small_blocks():
    """No SVD of W, no NF4 in --block-size blocks, and 8 bits on the integer grid in groups
    of 2 × --block-size instead of bitsandbytes' 8-bit blocks."""
    from svdq.algo.factorize import LayerStats
    from svdq.pipeline.measured import measure_layer
    from svdq.pipeline.work import LayerWork
    torch.manual_seed(0)
    x = torch.randn(512, 96).double() * torch.linspace(0.2, 2, 96).double()
    layer = torch.nn.Linear(96, 80, bias=False)
    kinds = {}
    for quick in (True, False):
        settings = Settings(budget_ratio=0.27, method="whiten", fast=quick)
        work = LayerWork("l", layer, None, None, LayerStats(x.T @ x, x.sum(0), 512),
                         settings.method)
        opts = measure_layer(work, settings, (4.3, 4.3)).options
        kinds[quick] = {(o.kind, o.bits, o.block, o.grid) for o in opts}
        assert (work.given is None) == quick  # no SVD of W at all when fast
    assert not any(k[0] == "lowrank" for k in kinds[True])
    assert any(k[0] == "lowrank" for k in kinds[False])
    nf4 = ("dense", 4, None, "bnb")  # NF4 in blocks of --block-size
    assert nf4 in kinds[False] and nf4 not in kinds[True]
    assert ("dense", 8, None, "bnb") in kinds[False] and ("dense", 8, None, "bnb") not in kinds[True]
    assert ("dense", 8, 128, "int") in kinds[True] and ("dense", 8, 128, "int") not in kinds[False]
    assert any(k[0] == "residual" for k in kinds[True])
