"""What the sweep's tests share: the calibration and evaluation they use on the tiny llama, how
they find a row, and the bytes a baseline must store (from the formats and shapes alone)."""
from __future__ import annotations

import math

from svdq.models import layers as surgery

from conftest import make_text

CALIB = dict(calib_samples=8, calib_len=64)
CALIB_ARGS = ["--calib-samples", "8", "--calib-len", "64"]
CTX = 64
BLOCK = 64
EVAL_TEXT = make_text(600, seed=11)  # another seed than the calibration text


def key(row: dict) -> tuple:
    return row["method"], row["bits"], row["eps"]


def row_of(rows: list[dict], method: str, bits: int | None, eps: float | None) -> dict:
    found = [r for r in rows if key(r) == (method, bits, eps)]
    assert len(found) == 1, (method, bits, eps)
    return found[0]


def expected_bytes(model, how: str) -> int:
    """Bytes of the target layers stored `how`, from the storage formats (svdq.algo.quant's
    table) and the layers' shapes alone: codes, one float32 absmax per block of 64, biases as
    loaded."""
    total = 0
    for name in surgery.targets(model, (), ()):
        module = model.get_submodule(name)
        n = module.weight.numel()
        own = module.weight.element_size()
        stored = {"source": n * own, "fp16": 2 * n, "bnb-8bit": n + 4 * math.ceil(n / BLOCK),
                  "bnb-nf4": math.ceil(n / 2) + 4 * math.ceil(n / BLOCK)}[how]
        if module.bias is not None:
            stored += module.bias.numel() * module.bias.element_size()
        total += stored
    return total
