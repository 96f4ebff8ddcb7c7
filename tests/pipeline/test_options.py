"""A budget's option table with `--sparse`: sparse variants of a base and its corrections share
one refit of the base, so their cost does not grow with the ranks that get a variant."""
from __future__ import annotations

from svdq.config import Settings
from svdq.models import load as hf
from svdq.pipeline import measured, options
from svdq.pipeline.inputs import calibration_ids
from svdq.pipeline.walk import analyse
from svdq.pipeline.work import Clock


def test_sparse_variants_refit_each_base_once(models, calib_file, monkeypatch):
    source = hf.load_source(str(models["llama"]))
    settings = Settings(budget_ratio=0.3, sparse=0.01, calib=str(calib_file), calib_samples=4,
                        calib_len=32, batch_size=4)
    ids = calibration_ids(source, settings, lambda *a: None, {})
    work = analyse(source, settings, ids, lambda *a: None, Clock(), gradients=True)[0]
    calls: list[tuple] = []
    real = options.residual_of

    def counted(w, stats, bits, block, *rest):
        calls.append((bits, block, *rest[1:2]))
        return real(w, stats, bits, block, *rest)
    monkeypatch.setattr(measured, "residual_of", counted)  # the bases
    monkeypatch.setattr(options, "residual_of", counted)  # their refits to W − S
    opts = measured.measure_layer(work, settings).options
    bases = options.bases(settings)
    sparse = [o for o in opts if o.sparse]
    assert any(o.kind == "residual" for o in sparse) and any(o.kind == "dense" for o in sparse)
    assert len(calls) == 2 * len(bases)  # the base itself, and its one refit to W − S
    assert sorted(set(calls)) == sorted({(b, k, g) for b, k, g in bases})
    for o in sparse:  # a variant is offered only where the term lowers the form's error
        twin = next(x for x in opts if not x.sparse and (x.kind, x.rank, x.bits, x.block, x.grid)
                    == (o.kind, o.rank, o.bits, o.block, o.grid))
        assert o.error < twin.error and o.bytes > twin.bytes
