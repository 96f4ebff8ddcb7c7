"""svdq.sweep, the library: one analysis serves every setting, every row's bytes are what
realizing its choice stores (cross-checked against `compress` and the artifact it saves), the
baselines are the models they claim to be, the Pareto frontier. The command, its files and its
one-line errors: tests/sweep/test_sweep_command.py.

The tiny llama is calibrated on 8×64 tokens. Its weights are random (flat spectra), so low-rank
layers appear only at large eps; the settings below give every kind of layer at least once:
kept as loaded (4-bit, eps 0.05: NF4 misses eps), dense 8-bit, dense NF4 and low-rank.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import svdq.algo.factorize
from svdq import artifact, sweep
from svdq import evaluate as ev
from svdq.models import layers as surgery
from svdq.models import load as hf
from svdq.pipeline.compress import compress
from svdq.config import Settings

from sweep_rows import CALIB, CTX, EVAL_TEXT, expected_bytes, key, row_of

EPS = [0.05, 0.35, 0.38]
BITS = [4, 8]
LLAMA_TARGETS = 14  # 2 blocks × (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def swept(models, calib_file):
    """One library sweep of the tiny llama (3 eps × 2 bits), with the factorization counted and
    the per-layer plans of every variant recorded."""
    source = hf.load_source(str(models["llama"]))
    before = {k: v.clone() for k, v in source.model.state_dict().items()}
    classes = {n: type(m) for n, m in source.model.named_modules()}
    # rounding, as bitsandbytes does: the eps rows' dense fallback is then the bnb baseline's
    settings = Settings(eps=EPS[0], bits=BITS[0], calib=str(calib_file), gptq=False, **CALIB)
    measure, metric = sweep.evaluator(source, (EVAL_TEXT, "eval"), None, CTX, None, 0, 1)
    factorized: list[tuple[int, ...]] = []
    plans: list[list[dict]] = []  # one list per variant, in the order they are built
    real_method, real_variant = svdq.algo.factorize.METHODS["svd"], sweep._variant

    def counting(w, stats, dtype=torch.float64):
        factorized.append(tuple(w.shape))
        return real_method(w, stats, dtype)

    def recording(model, works, choices, settings_):
        variant, layer_plans = real_variant(model, works, choices, settings_)
        plans.append(layer_plans)
        return variant, layer_plans

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(svdq.algo.factorize.METHODS, "svd", counting)
        mp.setattr(sweep, "_variant", recording)
        results = sweep.run(source, settings, EPS, BITS, measure, metric)
    rows = results["rows"]
    assert rows[0]["method"] == "source" and len(plans) == len(rows) - 1
    by_row = {key(r): p for r, p in zip(rows[1:], plans)}  # the source row builds no variant
    return SimpleNamespace(source=source, before=before, classes=classes, results=results,
                           rows=rows, plans=by_row, factorized=factorized)


# ----------------------------------------------------------------------------- the library
def test_rows_are_the_baselines_and_every_setting(swept):
    rows = swept.rows
    expected = [("source", None, None), ("fp16", 16, None), ("bnb-nf4", 4, None),
                ("bnb-8bit", 8, None)] + [("svd", b, e) for b in BITS for e in EPS]
    assert sorted(map(key, rows), key=str) == sorted(expected, key=str)
    assert len(rows) == len(expected)
    assert all(r["layers"] == LLAMA_TARGETS and math.isfinite(r["quality"]) for r in rows)
    assert swept.results["metric"] == "perplexity"
    # the source row is the source model, measured directly on the same tokens and windows
    fresh = hf.load_source(str(swept.source.id)).model
    ids = ev.tokenize(swept.source.tokenizer, EVAL_TEXT, 0)
    assert row_of(rows, "source", None, None)["quality"] == ev.perplexity(fresh, ids, CTX)["ppl"]
    # every kind of layer occurs in some setting, so the byte checks below cover them all
    kinds = {(p["kind"], p["bits"]) for (m, _, _), ps in swept.plans.items() if m == "svd"
             for p in ps}
    assert {("lowrank", 4), ("lowrank", 8), ("dense", 4), ("dense", 8), ("dense", None)} <= kinds


def test_baseline_bytes_are_what_is_stored(swept):
    model = swept.source.model
    for how in ("source", "fp16", "bnb-8bit", "bnb-nf4"):
        row = row_of(swept.rows, how, {"source": None, "fp16": 16, "bnb-8bit": 8,
                                       "bnb-nf4": 4}[how], None)
        assert row["target_bytes"] == expected_bytes(model, how), how
    fp16 = expected_bytes(model, "fp16")  # the tiny llama has no biases: all of it is weights
    assert swept.results["target_fp16_bytes"] == fp16
    for r in swept.rows:
        assert r["target_ratio_fp16"] == pytest.approx(r["target_bytes"] / fp16)
        if r["method"] != "source":  # a row's bytes are the sum of its layers' plans
            plans = swept.plans[key(r)]
            assert r["target_bytes"] == sum(p["bytes"] for p in plans), key(r)
            assert r["lowrank_layers"] == sum(p["kind"] == "lowrank" for p in plans)


def _file_bytes(folder: Path, names: list[str]) -> int:
    """Bytes of the tensors in the artifact's file that belong to the given layers."""
    with safe_open(folder / "model.safetensors", "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                   if any(k.startswith(n + ".") for n in names))


def test_svd_rows_match_compress_and_the_artifact(swept, models, calib_file, tmp_path):
    """Every (bits, eps) row against `compress` at the same settings and calibration: the same
    total bytes (in the manifest and in model.safetensors), the same per-layer choices."""
    for bits in BITS:
        for eps in EPS:
            row = row_of(swept.rows, "svd", bits, eps)
            source = hf.load_source(str(models["llama"]))
            settings = Settings(eps=eps, bits=bits, calib=str(calib_file), gptq=False, **CALIB)
            out = tmp_path / f"{bits}-{eps}"
            manifest = artifact.save(out, source, compress(source, settings), settings)
            layers = manifest["layers"]
            assert row["target_bytes"] == manifest["totals"]["target_bytes"], (bits, eps)
            assert row["target_bytes"] == _file_bytes(out, [p["name"] for p in layers])
            mine = swept.plans[("svd", bits, eps)]
            fields = ("name", "kind", "rank", "k_break", "bits", "bytes")
            assert [tuple(p[f] for f in fields) for p in mine] == \
                   [tuple(p[f] for f in fields) for p in layers], (bits, eps)
            assert [p["error"] for p in mine] == pytest.approx([p["error"] for p in layers],
                                                               rel=1e-9, abs=1e-12)
            assert row["lowrank_layers"] == manifest["totals"]["lowrank_layers"]


def test_bnb_8bit_row_is_svd_8bit_with_every_layer_dense(swept):
    """At eps 0.05 no rank qualifies and every layer falls back to dense 8-bit: the very model
    the bnb-8bit baseline builds, so the same bytes and the same perplexity to the bit."""
    svd8 = row_of(swept.rows, "svd", 8, 0.05)
    bnb8 = row_of(swept.rows, "bnb-8bit", 8, None)
    assert {(p["kind"], p["bits"]) for p in swept.plans[key(svd8)]} == {("dense", 8)}
    assert svd8["target_bytes"] == bnb8["target_bytes"]
    assert svd8["quality"] == bnb8["quality"]
    assert svd8["mean_layer_error"] == bnb8["mean_layer_error"]
    # and it is a changed model, not the source again
    assert bnb8["quality"] != row_of(swept.rows, "source", None, None)["quality"]
    # likewise at 4 bits, NF4 misses eps 0.05 everywhere: every layer is kept as loaded
    svd4 = row_of(swept.rows, "svd", 4, 0.05)
    source = row_of(swept.rows, "source", None, None)
    assert {(p["kind"], p["bits"]) for p in swept.plans[key(svd4)]} == {("dense", None)}
    assert (svd4["target_bytes"], svd4["quality"]) == (source["target_bytes"], source["quality"])


def test_factorization_runs_once_per_layer(swept):
    targets = surgery.targets(swept.source.model, (), ())
    assert len(targets) == LLAMA_TARGETS
    settings = [r for r in swept.rows if r["eps"] is not None]
    assert len(settings) == len(EPS) * len(BITS) == 6
    assert len(swept.factorized) == LLAMA_TARGETS  # not 6 × 14
    shapes = sorted(tuple(swept.source.model.get_submodule(n).weight.shape) for n in targets)
    assert sorted(swept.factorized) == shapes


def test_source_model_is_left_untouched(swept):
    model = swept.source.model
    after = model.state_dict()
    assert list(after) == list(swept.before)
    assert all(torch.equal(after[k], v) for k, v in swept.before.items())
    assert {n: type(m) for n, m in model.named_modules()} == swept.classes
    assert not model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_pareto_flags_match_brute_force(swept):
    """The rows flagged in a real sweep are exactly those no other row beats or equals on both
    axes with one strictly better."""
    rows = swept.rows

    def beaten(r):
        return any(o["target_bytes"] <= r["target_bytes"] and o["quality"] <= r["quality"]
                   and (o["target_bytes"], o["quality"]) != (r["target_bytes"], r["quality"])
                   for o in rows)
    assert [r["pareto"] for r in rows] == [not beaten(r) for r in rows]
    assert any(r["pareto"] for r in rows) and not all(r["pareto"] for r in rows)


def test_pareto_on_a_constructed_list():
    def r(name, nbytes, quality):
        return {"name": name, "target_bytes": nbytes, "quality": quality}

    rows = [r("A", 100, 10.0), r("B", 200, 8.0), r("C", 200, 9.0), r("D", 300, 8.0),
            r("E", 100, 10.0), r("F", 400, 5.0), r("G", 50, 20.0), r("H", 60, 25.0),
            r("I", 50, 21.0)]
    low = sweep.pareto(rows, lower_is_better=True)
    # C loses to B (same bytes, worse), D to B (more bytes, same quality), I to G, H to G;
    # A and E are an exact tie: neither beats the other, both stay
    assert [x["name"] for x in low] == ["G", "A", "E", "B", "F"]
    assert all(any(x is y for y in rows) for x in low)  # the rows themselves, not copies
    high = sweep.pareto(rows, lower_is_better=False)
    # I beats G (same bytes, higher); H costs more than I but is better; the rest lose to H
    assert [x["name"] for x in high] == ["I", "H"]
    assert sweep.pareto([], True) == []
    assert [x["name"] for x in sweep.pareto([r("A", 1, 1.0), r("B", 1, 1.0)], False)] == ["A", "B"]
