"""`--device cuda`: the same plans, bytes and outputs as on the CPU, in every mode.

These run only where a CUDA GPU is present (CI has none: they are skipped there, and the GPU
runs are recorded in benchmarks/RESULTS.md, "On a GPU"). Each case compresses a tiny model
twice, `--device cpu` and `--device cuda`, and compares what was stored.
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from svdq import runtime
from svdq.cli import app
from conftest import FAST, make_text

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = {  # name: (model, options)
    "eps 8-bit": ("gpt2", ["--eps", "0.3", "--bits", "8"]),
    "eps NF4 residual": ("llama", ["--eps", "0.2", "--bits", "4", "--residual"]),
    "eps int3 GPTQ": ("llama", ["--eps", "0.2", "--bits", "3"]),
    "eps fisher": ("llama", ["--eps", "0.3", "--method", "fisher"]),
    "eps sparse": ("gpt2", ["--eps", "0.2", "--bits", "4", "--sparse", "0.02"]),
    "attention product": ("bert", ["--eps", "0.3", "--attention-product"]),
    "budget": ("llama", ["--ratio", "0.4"]),
    "budget with sparse terms": ("llama", ["--ratio", "0.3", "--sparse", "0.01"]),
    "budget with the product": ("gpt2", ["--ratio", "0.4", "--attention-product"]),
    "sequential refit": ("llama", ["--eps", "0.3", "--sequential", "--refit"]),
    "not streamed, offloaded": ("gpt2", ["--eps", "0.3", "--no-stream", "--offload-activations"]),
}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def compressed(models, calib_file, root: Path, case: str, device: str) -> dict:
    arch, options = CASES[case]
    out = root / f"{case.replace(' ', '-').replace(',', '')}-{device}"
    r = run("compress", models[arch], "-o", out, "--calib", calib_file, *FAST, *options,
            "--device", device)
    assert r.exit_code == 0, r.output + "".join(traceback.format_exception(*r.exc_info))
    return json.loads((out / runtime.MANIFEST).read_text()) | {"folder": out}


def forms(manifest: dict) -> dict:
    keep = ("kind", "rank", "bits", "factor_bits", "grid", "sparse_nnz", "rows")
    return {p["name"]: {k: p.get(k) for k in keep} for p in manifest["layers"]}


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_stores_what_the_cpu_stores(case, models, calib_file, tmp_path):
    cpu = compressed(models, calib_file, tmp_path, case, "cpu")
    gpu = compressed(models, calib_file, tmp_path, case, "cuda")
    assert forms(gpu) == forms(cpu)
    assert gpu["totals"]["target_bytes"] == cpu["totals"]["target_bytes"]
    assert gpu["device"]["type"] == "cuda" and gpu["device"]["peak_allocated_mb"] >= 0
    assert cpu["device"] == {"type": "cpu"}
    arch = CASES[case][0]
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = runtime.load(cpu["folder"])(input_ids=ids)
        b = runtime.load(gpu["folder"])(input_ids=ids)
    a, b = (x.logits if arch != "bert" else x.last_hidden_state for x in (a, b))
    # the same forms; codes may round the other way where float sums differ in the last bit
    assert (a - b).norm() <= 2e-2 * a.norm(), (a - b).norm() / a.norm()


@pytest.fixture(scope="module")
def artifact(models, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cuda") / "llama"
    r = run("compress", models["llama"], "-o", out, "--calib", calib_file, *FAST,
            "--eps", "0.2", "--bits", "4")
    assert r.exit_code == 0, r.output
    return out


def test_an_artifact_loads_and_runs_on_the_gpu(artifact):
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_cpu = runtime.load(artifact)(input_ids=ids).logits
        model = runtime.load(artifact, device="cuda")
        assert all(t.device.type == "cuda" for t in model.state_dict().values())
        on_gpu = model(input_ids=ids.cuda()).logits.cpu()
    assert torch.allclose(on_gpu, on_cpu, rtol=1e-3, atol=1e-4)


def test_eval_on_the_gpu_matches_the_cpu(artifact, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(make_text(400, seed=5))
    ppl = {}
    for device in ("cpu", "cuda"):
        r = run("eval", artifact, "--ppl", text, "--ctx", "64", "--json", "--device", device)
        assert r.exit_code == 0, r.output
        ppl[device] = json.loads(r.stdout)["ppl"]["rows"][0]["ppl"]
    assert ppl["cuda"] == pytest.approx(ppl["cpu"], rel=1e-3)


def test_finetune_on_the_gpu(artifact, calib_file, tmp_path):
    r = run("finetune", artifact, "-o", tmp_path / "tuned", "--calib", calib_file, "--steps", "20",
            "--seq-len", "32", "--eval-every", "10", "--lr", "1e-3", "--device", "cuda")
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "tuned" / runtime.MANIFEST).read_text())["recovery"][-1]
    assert record["val_loss_after"] < record["val_loss_before"]


def test_a_streamed_compress_gives_the_gpu_memory_back(models, calib_file, tmp_path):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    compressed(models, calib_file, tmp_path, "budget", "cuda")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 2 ** 20  # nothing held on after it


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_kernels_run_the_stored_codes(bits, models, calib_file, tmp_path,
                                                    monkeypatch):
    """On a GPU a kept layer's NF4 and 8-bit codes go to bitsandbytes' kernels as stored; they
    compute what the torch de-quantizer computes."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / f"b{bits}"
    r = run("compress", models["llama"], "-o", out, "--calib", calib_file, *FAST,
            "--eps", "0.2", "--bits", bits, "--residual")
    assert r.exit_code == 0, r.output
    model = runtime.load(out, device="cuda")
    packed = [m for m in model.modules() if isinstance(m, runtime.Packed) and m.grid == "bnb"]
    assert packed
    for w in packed:
        assert w._kernels() is not None
        ref = w.rows(0, w.shape[0])  # the torch path, banded
        assert torch.equal(w.full(), ref)
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
            for tokens in (1, 9):  # a decode step (gemv) and a prefill
                x = torch.randn(tokens, w.shape[1], device="cuda", dtype=dtype)
                y = w.matmul(x).float()
                expect = x.float() @ ref.T
                assert (y - expect).norm() <= tol * expect.norm() + 1e-6, (dtype, tokens)
    calls = []
    real = runtime._bnb_matmul
    monkeypatch.setattr(runtime, "_bnb_matmul", lambda *a: calls.append(a[1]) or real(*a))
    ids = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_gpu = model(input_ids=ids.cuda()).logits.cpu()
    assert calls  # the forward went through the kernels
    monkeypatch.undo()
    with torch.no_grad():
        on_cpu = runtime.load(out)(input_ids=ids).logits
    assert (on_gpu - on_cpu).norm() <= 1e-3 * on_cpu.norm()
