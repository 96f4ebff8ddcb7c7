"""What fine-tuning trains: the fake quantizer is the stored grid with a straight-through
gradient, and a tuned layer computes what its stored layer computes until it trains."""
from __future__ import annotations

import pytest
import torch

import svdq
from svdq import runtime
from svdq.algo import quant
from svdq.recovery import tuned
from svdq.recovery.coded import Coded
from conftest import compress_all, planted


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_fake_quant_is_what_is_stored_with_an_identity_gradient(bits):
    t = torch.randn(37, 100, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q = tuned.fake_quant(t, bits, 64)
    stored = tuned.stored_factor(t, bits, 64)
    assert torch.equal(q, stored.dequantize())
    bnb = quant.quantize(t, bits, 64)
    if bits != 8:  # NF4 and float16: bitsandbytes' codes exactly
        assert torch.equal(stored.data, bnb.data)
    else:  # 8 bits: a scale per block that fits the asymmetric codes, never a worse error
        err = [(x.dequantize() - t).norm() for x in (stored, bnb)]
        assert err[0] <= err[1] * 1.0001
    q.sum().backward()
    assert torch.equal(t.grad, torch.ones_like(t))


@pytest.mark.parametrize("bits", [4, 8])
def test_storing_a_stored_factor_again_changes_nothing(bits):
    t = torch.randn(20, 100, generator=torch.Generator().manual_seed(2))
    once = quant.quantize(t, bits, 64).dequantize()  # as compress stores it
    again = tuned.stored_factor(once, bits, 64).dequantize()
    assert torch.equal(once, again)


FORMS = {"budget": ("llama", ["--ratio", "0.3"]),
         "sparse": ("gpt2", ["--eps", "0.6", "--bits", "4", "--sparse", "0.05"]),
         "product": ("planted", ["--eps", "0.05", "--bits", "8", "--attention-product"])}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_tuned_layers_compute_the_stored_layers_and_train_what_the_form_allows(tmp_path, form,
                                                                                models, calib_file):
    arch, extra = FORMS[form]
    src = planted("gpt2", tmp_path / "src") if arch == "planted" else models[arch]
    out = compress_all({"m": src}, calib_file, tmp_path, {"m": extra})["m"]
    manifest = svdq.artifact.read(out)
    model = runtime.load(out, dtype="float32")
    ids = torch.randint(3, 40, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    plain = tuned.prepare(model, manifest)
    layers = [m for m in model.modules() if isinstance(m, tuned.TunedLinear)]
    assert layers and not any(isinstance(m, runtime.StoredLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = [n for n, m in model.named_modules() if tuned.is_norm(m)]
    assert any(f"{n}.weight" in plain for n in norms) and set(plain) <= trainable
    for m in layers:  # the scales of quantized parts train, their codes (`base`) never
        for part in (m.dense, *((m.u, m.v) if m.rank else ())):
            if isinstance(part, tuned.Scaled):
                assert part.delta.requires_grad and not part.base.requires_grad
            elif part is not None:
                assert not part.requires_grad  # 16-bit: frozen
        assert not m.rank or m.log_s.requires_grad
    assert any(isinstance(p, tuned.Scaled) for m in layers
               for p in (m.dense, *((m.u, m.v) if m.rank else ())))
    assert not any("embed" in n for n in trainable)
    # gradients reach what trains in each form: a sparse term's values, a rows layer's scales
    model(input_ids=ids).logits.square().sum().backward()
    if form == "sparse":
        sparse = [m.sparse for m in layers if m.sparse is not None]
        assert sparse and all(s.values.grad.abs().sum() > 0 for s in sparse)
    if form == "product":
        rows = [m for m in layers if m.index is not None]
        assert rows and all(m.dense.delta.grad.abs().sum() > 0 for m in rows)


def test_float32_takes_models_transformers_flags_as_quantized():
    import transformers

    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=30)
    model = transformers.BertModel(config).to(torch.bfloat16)
    model.is_quantized = True  # as a GGUF source de-quantized on load is flagged
    with pytest.raises(ValueError):
        model.float()
    assert next(tuned.float32(model).parameters()).dtype == torch.float32


@pytest.mark.parametrize("grid,bits", [("int", 3), ("int", 4), ("bnb", 4), ("bnb", 8)])
def test_scaled_is_the_stored_tensor_and_writes_its_scales_back(grid, bits):
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(3))
    q = quant.quantize(w, bits, 32, grid)
    packed = runtime.Packed((24, 100), bits, 32, grid, runtime.codebooks([4, 8]) if grid == "bnb" else None)
    books = packed.books
    if books is not None:
        for b in (4, 8):
            books.register_buffer(str(b), quant.codebook(b))
    for name, t in q.tensors("").items():
        packed.register_buffer(name.lstrip("."), t if name != ".scales" else t.reshape(24, -1))
    s = tuned.Scaled(packed)
    torch.testing.assert_close(s.value(), q.dequantize())
    with torch.no_grad():
        s.delta.add_(0.01)
    s.settle()
    (key, t), = s.tensors("w").items()
    assert key == "w" + (runtime.SCALES if grid == "int" else runtime.ABSMAX)
    old = q.scales if grid == "int" else q.absmax
    assert t.dtype == old.dtype and t.numel() == old.numel()
    torch.testing.assert_close(t.float().reshape(-1), old.float().reshape(-1) * 1.01 ** 1.0,
                               rtol=2e-3, atol=0)


def _packed(w: torch.Tensor, bits: int, grid: str, block: int = 32):
    """`w` quantized and held as the loaders hold it (a `runtime.Packed`), and the quantized."""
    q = quant.quantize(w, bits, block, grid)
    packed = runtime.Packed(tuple(w.shape), bits, block, grid,
                            runtime.codebooks([4, 8]) if grid == "bnb" else None)
    if packed.books is not None:
        for b in (4, 8):
            packed.books.register_buffer(str(b), quant.codebook(b))
    for name, t in q.tensors("").items():
        packed.register_buffer(name.lstrip("."), t if name != ".scales" else t.reshape(w.shape[0], -1))
    return packed, q


@pytest.mark.parametrize("grid,bits", [("int", 2), ("int", 3), ("int", 4), ("int", 8),
                                       ("bnb", 4), ("bnb", 8)])
def test_coded_trains_codes_and_scales_and_stores_exactly_what_it_computes(grid, bits):
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(4))
    packed, q = _packed(w, bits, grid)
    c = Coded(packed)
    assert torch.equal(c.value(), q.dequantize())  # the stored tensor until it trains
    assert set(c.tensors("w")) == set(q.tensors("w"))
    for key, t in c.tensors("w").items():  # the same codes and scales back, bit for bit
        assert torch.equal(t.reshape(-1), q.tensors("w")[key].reshape(-1)), key
    upstream = torch.randn(24, 100, generator=torch.Generator().manual_seed(6))
    c.value().mul(upstream).sum().backward()  # gradients reach values and scales
    assert c.latent.grad.abs().sum() > 0
    scaled = tuned.Scaled(packed)  # the scales' gradient is Scaled's (the codes held)
    scaled.value().mul(upstream).sum().backward()
    torch.testing.assert_close(c.delta.grad, scaled.delta.grad)
    with torch.no_grad():  # train: move the values (in grid steps) and the scales
        c.latent.add_(torch.randn(24, 100, generator=torch.Generator().manual_seed(5)) * 0.5)
        c.delta.add_(0.02)
    c.settle()
    stored = c.tensors("w")
    again, _ = _packed(w, bits, grid)
    for key, t in stored.items():  # same keys, dtypes and sizes: the bytes cannot change
        old = q.tensors("w")[key]
        assert t.dtype == old.dtype and t.numel() == old.numel()
        name = key.split(".", 1)[1]
        again.register_buffer(name, t if name != "scales" else t.reshape(24, -1))
    codes_changed = not torch.equal(stored["w" + runtime.CODES], q.tensors("w")["w" + runtime.CODES])
    assert codes_changed
    if grid == "int":  # the zero points stay
        assert torch.equal(stored["w" + runtime.ZEROS], q.zeros)
    want = runtime.dequantize_int(again.codes, again.scales, again.zeros, (24, 100), 32, bits) \
        if grid == "int" else runtime.dequantize(again.codes, again.absmax, quant.codebook(bits),
                                                 (24, 100), 32, bits)
    assert torch.equal(c.value(), want)  # what it computes is what loads


@pytest.mark.parametrize("tied", [True, False])
def test_prepare_trains_a_float_embedding_and_head_only_when_asked(tied):
    import transformers

    from conftest import tiny_config

    config = tiny_config("llama", 50)
    config.tie_word_embeddings = tied
    model = transformers.LlamaForCausalLM(config)
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & tuned.prepare(model, {"layers": []}).keys()
    keys = {k for k in tuned.prepare(model, {"layers": []}, embedding=True) if "norm" not in k}
    # a tied head is the embedding's own tensor, stored under the embedding's key
    assert keys == ({"model.embed_tokens.weight"} if tied else {"model.embed_tokens.weight",
                                                                 "lm_head.weight"})
    assert model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad


def test_train_embedding_refuses_a_model_with_no_float_embedding():
    import transformers

    from svdq.errors import SvdqError

    config = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8],
                                       depths=[1], num_labels=3)
    with pytest.raises(SvdqError, match="--train-embedding"):
        tuned.prepare(transformers.ResNetForImageClassification(config), {"layers": []},
                      embedding=True)
