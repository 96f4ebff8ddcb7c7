"""The global byte budget: svdq.algo.allocate on constructed options, and `svdq compress
--ratio/--size` end to end on the tiny llama (the option tables: tests/pipeline/test_options.py).

Small examples are checked against brute force over every allocation, so the allocator is
tested against the definition (least Σ error² with Σ bytes ≤ budget), not against itself.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import re

import pytest
import torch
from typer.testing import CliRunner

import svdq
from svdq import artifact
from svdq.algo.allocate import Option, allocate, greedy, table, total
from svdq.cli import app
from svdq.models import load as hf
from svdq.pipeline.compress import compress
from svdq.config import Settings, parse_size
from svdq.errors import SvdqError

from conftest import make_text

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ----------------------------------------------------------------------------- helpers
def opt(nbytes: int, error2: float) -> Option:
    return Option(nbytes, math.sqrt(error2), "lowrank", 1, 8)


def random_options(seed: int, layers: int | None = None, n: int | None = None) -> list[list[Option]]:
    """Layers of random options: bytes 1..100, errors anywhere (more bytes need not help)."""
    rng = random.Random(seed)
    layers, n = layers or rng.randint(2, 4), n or rng.randint(2, 5)
    return [[Option(rng.randint(1, 100), rng.random(), "lowrank", 1, 8) for _ in range(n)]
            for _ in range(layers)]


def svd_like_options(seed: int, layers: int) -> list[list[Option]]:
    """Layers like real ones: tens of bytes per rank, error falling convexly with it."""
    rng = random.Random(seed)
    out = []
    for _ in range(layers):
        per_rank, decay = rng.randint(20, 90), rng.uniform(0.7, 0.95)
        out.append([Option(per_rank * k + 16, decay ** k, "lowrank", k, 8) for k in range(1, 25)])
    return out


def brute_force(options: list[list[Option]], budget: int) -> float:
    """The least Σ error² of any allocation within `budget`."""
    return min(total(options, a)[1] for a in itertools.product(*(range(len(o)) for o in options))
               if total(options, a)[0] <= budget)


def span(options: list[list[Option]]) -> range:
    """Budgets from the least achievable to the most any allocation can use."""
    return range(sum(min(o.bytes for o in opts) for opts in options),
                 sum(max(o.bytes for o in opts) for opts in options) + 1)


def no_single_change_fits(options, alloc, budget) -> bool:
    used = total(options, alloc)[0]
    return not any(o.error < opts[i].error and used - opts[i].bytes + o.bytes <= budget
                   for opts, i in zip(options, alloc) for o in opts)


# ----------------------------------------------------------------------------- allocate
@pytest.mark.parametrize("seed", range(20))
def test_meets_the_budget_and_leaves_no_fitting_improvement(seed):
    options = random_options(seed)
    for budget in span(options):
        alloc = allocate(options, budget)
        assert total(options, alloc)[0] <= budget
        assert no_single_change_fits(options, alloc, budget)


def test_uses_the_budget_exactly_where_it_can_be_reached():
    # one layer with 1-byte steps (error falling) that the budget can never fill: any byte
    # left over would lower its error, so every budget is met exactly
    fine = [opt(b, 1.0 / b) for b in range(1, 201)]
    coarse = [opt(10, 4.0), opt(30, 1.0), opt(70, 0.1)]
    options = [coarse, fine, coarse]
    for budget in range(21, 10 + 10 + 200):
        assert total(options, allocate(options, budget))[0] == budget


@pytest.mark.parametrize("seed", range(10))
def test_uses_at_least_99_percent_of_a_reachable_budget(seed):
    options = svd_like_options(seed, 30)
    rng = random.Random(100 + seed)
    for _ in range(5):
        budget = total(options, [rng.randrange(len(o)) for o in options])[0]
        assert budget * 0.99 <= total(options, allocate(options, budget))[0] <= budget


def test_never_worse_than_a_uniform_setting_where_greedy_alone_loses():
    # (5 bytes, error² 36) lies above the hull from (1, 100) to (6, 0): the hull greedy spends
    # 6 bytes on one layer and cannot afford the second; both layers at the middle option win
    layer = [opt(1, 100.0), opt(5, 36.0), opt(6, 0.0)]
    options, budget = [layer, layer], 10
    uniform = [[i, i] for i in range(3)]
    assert total(options, greedy(options, budget))[1] == 100.0  # the premise
    assert total(options, uniform[1]) == (10, 72.0)
    alloc = allocate(options, budget, uniform)
    assert total(options, alloc) == (10, 72.0)
    assert total(options, allocate(options, budget, [])) == (10, 72.0)  # the table finds it too


@pytest.mark.parametrize("seed", range(50))
def test_never_worse_than_any_uniform_allocation_and_optimal_when_small(seed):
    options = random_options(seed)
    n = len(options[0])
    uniform = [[i] * len(options) for i in range(n)]
    for budget in span(options)[::3]:
        alloc = allocate(options, budget, uniform)
        bytes_, err2 = total(options, alloc)
        assert bytes_ <= budget
        for u in uniform:
            if total(options, u)[0] <= budget:
                assert err2 <= total(options, u)[1]
        assert err2 == pytest.approx(brute_force(options, budget), rel=1e-12, abs=1e-15)


def test_infeasible_budget_names_the_least_bytes():
    options = [[opt(40, 1.0), opt(90, 0.0)], [opt(25, 1.0), opt(30, 0.5)]]
    with pytest.raises(ValueError, match=r"smallest achievable .* is 65 bytes"):
        allocate(options, 64)
    assert total(options, allocate(options, 65)) == (65, 2.0)


@pytest.mark.parametrize("seed", range(20))
def test_error_never_rises_with_the_budget(seed):
    options = random_options(seed, layers=4, n=5)
    errs = [total(options, allocate(options, b))[1] for b in span(options)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:]))
    least = math.fsum(min(o.error for o in opts) ** 2 for opts in options)
    assert errs[-1] == pytest.approx(least, rel=1e-12)  # all the bytes: every layer at its best


def test_greedy_and_table_alone_meet_the_budget():
    options = svd_like_options(3, 12)
    for budget in span(options)[::1999]:
        for alloc in (greedy(options, budget), table(options, budget)):
            assert alloc is not None and total(options, alloc)[0] <= budget


# ----------------------------------------------------------------------------- settings
def test_parse_size():
    assert parse_size("60MB") == 60_000_000 and parse_size("1.5GiB") == 3 * 2 ** 29
    assert parse_size("200000") == 200_000 and parse_size(" 2 kib ") == 2048
    assert parse_size("1B") == 1 and parse_size("0.5KB") == 500
    for bad in ("abc", "1TB", "-1MB", "", "0.1B", "MB"):
        with pytest.raises(SvdqError, match="--size"):
            parse_size(bad)


def test_budget_settings_are_validated():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(SvdqError, match="--ratio"):
            Settings(budget_ratio=bad)
    with pytest.raises(SvdqError, match="not both"):
        Settings(budget_ratio=0.3, budget_bytes=1000)
    s = Settings(budget_ratio=0.3)
    assert s.budgeted and Settings.from_dict(s.to_dict()) == s
    assert not Settings().budgeted


# ----------------------------------------------------------------------------- end to end
CALIB = dict(calib_samples=4, calib_len=32, batch_size=4)
FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]


def test_ratio_artifact_meets_the_budget_and_round_trips(models, calib_file, tmp_path):
    source = hf.load_source(str(models["llama"]))
    settings = Settings(budget_ratio=0.3, calib=str(calib_file), **CALIB)
    result = compress(source, settings)
    manifest = artifact.save(tmp_path / "out", source, result, settings)
    t, b = manifest["totals"], manifest["budget"]
    assert t["target_bytes"] <= 0.3 * t["target_fp16_bytes"]
    assert b["achieved_bytes"] == b["planned_bytes"] == t["target_bytes"] <= b["requested_bytes"]
    assert b["requested_bytes"] == math.floor(0.3 * t["target_fp16_bytes"])
    # the estimate's best plan uses the budget and is never worse, by the estimate, than a
    # uniform eps that fits; plain quantization was judged beside it, the lowest loss won
    cands = b["candidates"]
    assert cands[0]["plan"] == "error cap 0.1"
    assert cands[0]["bytes"] >= 0.95 * b["requested_bytes"]
    assert all(cands[0]["planned_error2"] <= u["error2"] for u in b["uniform"]
               if u["bytes"] <= b["requested_bytes"])
    assert any(c["plan"].endswith("no correction") for c in cands)
    assert b["plan"] == min(cands, key=lambda c: c["calibration_loss"])["plan"]
    chosen = next(c for c in cands if c["plan"] == b["plan"])
    assert b["achieved_bytes"] == chosen["bytes"]
    # the layers' errors are what was recorded
    assert b["error2"] == pytest.approx(math.fsum(p["sensitivity"] * p.get("token_factor", 1.0)
                                                  * p["error"] ** 2 for p in manifest["layers"]))
    if b["plan"].startswith("error cap"):
        assert len({p["bits"] for p in manifest["layers"]}) > 1  # bit widths are mixed
    ids = torch.tensor([source.tokenizer(make_text(24, 5), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        folded = svdq.load(tmp_path / "out", dequantize=True)(input_ids=ids).logits
        stored = svdq.load(tmp_path / "out")(input_ids=ids).logits
    # the in-memory model holds each layer as `dequantize=True` loads it (a correction folded
    # into its base's weight): bit for bit; the stored form adds U Σ (V x) apart: to rounding
    assert torch.equal(folded, expected)
    assert torch.allclose(stored, expected, rtol=0, atol=1e-5)


def test_cli_size_summary_and_manifest(models, calib_file, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["compress", str(models["llama"]), "-o", str(out), "--size",
                                 "30KB", "--calib", str(calib_file), *FAST])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "svdq.json").read_text())
    assert manifest["settings"]["_data"]["budget_bytes"] == 30_000
    assert manifest["totals"]["target_bytes"] <= 30_000
    shown = ANSI.sub("", r.stdout)
    assert "budget 0.03 MB requested" in shown
    if len(manifest["budget"]["candidates"]) > 1:  # what was judged, and which plan won
        assert f"plan: {manifest['budget']['plan']}, the lowest calibration loss of" in shown


@pytest.mark.parametrize("args,message", [
    (["--ratio", "0"], "--ratio must be a positive number"),
    (["--size", "abc"], "--size takes a number"),
    (["--size", "1B"], "smallest these 14 layers can be stored in"),
    (["--eps", "0.1", "--ratio", "0.3"], "give one of them"),
], ids=["ratio0", "size-abc", "size-1B", "eps-and-ratio"])
def test_cli_bad_budget_is_a_one_line_error_and_writes_nothing(models, calib_file, tmp_path,
                                                               args, message):
    parent = tmp_path / "parent"
    parent.mkdir()
    r = CliRunner().invoke(app, ["compress", str(models["llama"]), "-o", str(parent / "out"),
                                 "--calib", str(calib_file), *FAST, *args])
    stderr = ANSI.sub("", r.stderr).strip()
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert message in stderr, stderr
    assert list(parent.iterdir()) == []


def test_the_table_skips_only_options_another_beats_and_answers_the_same(monkeypatch):
    """`table` leaves out an option when another takes no more units and costs strictly less;
    on random tables its answers are those of the table over every option."""
    import random

    from svdq.algo import allocate as al

    opts = [Option(100, 0.5, "dense", 0, 4), Option(100, 0.4, "dense", 0, 4),  # same bytes
            Option(150, 0.4, "dense", 0, 4), Option(90, 0.6, "dense", 0, 4),  # equal cost: kept
            Option(200, 0.1, "dense", 0, 4)]
    assert al._front(opts, 1) == [1, 2, 3, 4]
    rng = random.Random(0)
    for _ in range(200):
        layers = [[Option(rng.randint(10, 2000), rng.random() ** 3, "dense", 0, 4, rng.random())
                   for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 8))]
        budget = rng.randint(10, 8 * 1500)
        resolution = rng.choice([64, 2 ** 20])
        pruned = table(layers, budget, resolution)
        with monkeypatch.context() as m:
            m.setattr(al, "_front", lambda o, unit: list(range(len(o))))
            assert table(layers, budget, resolution) == pruned
