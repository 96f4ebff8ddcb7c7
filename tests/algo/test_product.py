"""The attention product (svdq.algo.product): exact at full rank in real attention code, its
error formula equal to the scores' error computed explicitly, ranks shared by singular value."""
from __future__ import annotations

import pytest
import torch

from svdq.algo.factorize import LayerStats
from svdq.algo.product import head_products, runs, smallest_product, stored_product
from conftest import tiny_config


def _stats(x: torch.Tensor) -> LayerStats:
    x = x.reshape(-1, x.shape[-1]).double()
    return LayerStats(x.T @ x, x.sum(0), x.shape[0])


def _data(n=48, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, n, generator=g) @ torch.randn(n, n, generator=g) * 0.3 + 0.5).double()


def _scores(x, wq, bq, wk, bk, h, d):
    q = x @ wq.T + (0 if bq is None else bq)
    k = x @ wk.T + (0 if bk is None else bk)
    return q[:, h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T


def test_the_error_formula_is_the_scores_error_over_every_pair_of_tokens():
    x, heads, d = _data(), 4, 12
    g = torch.Generator().manual_seed(1)
    wq, wk = torch.randn(heads * d, 48, generator=g).double(), torch.randn(heads * d, 48, generator=g).double()
    bq = torch.randn(heads * d, generator=g).double()
    products = head_products(wq, bq, wk, heads, _stats(x))
    form = stored_product(products, 20, 8, 64)
    q = torch.cat([form.q.dequantize().double(), form.q_bias.double()[:, None]], 1)
    k = form.k.dequantize().double()
    err = ref = 0.0
    at = 0
    for h, r in enumerate(form.ranks):
        s0 = _scores(x, wq, bq, wk, None, h, d)
        s1 = (x @ q[at:at + r, :-1].T + q[at:at + r, -1]) @ (x @ k[at:at + r].T).T
        err, ref, at = err + float(((s1 - s0) ** 2).sum()), ref + float((s0 ** 2).sum()), at + r
    assert form.error == pytest.approx((err / ref) ** 0.5, rel=1e-6)
    assert sum(form.ranks) == 20


def test_ranks_go_to_the_largest_singular_values_across_heads():
    x, heads, d = _data(), 3, 8
    g = torch.Generator().manual_seed(2)
    scale = torch.tensor([10.0] * d + [1.0] * d + [0.1] * d)[:, None]
    wq = torch.randn(heads * d, 48, generator=g).double() * scale
    wk = torch.randn(heads * d, 48, generator=g).double()
    products = head_products(wq, None, wk, heads, _stats(x))
    ranks = products.ranks(d)
    assert ranks[0] >= ranks[1] >= ranks[2] and sum(ranks) == d
    flat = sorted(torch.cat(products.sigma).tolist(), reverse=True)
    kept = sum(float((s[:r] ** 2).sum()) for s, r in zip(products.sigma, ranks))
    assert kept == pytest.approx(sum(v * v for v in flat[:d]))
    assert runs([2, 0, 3], 8, offset=24) == [[24, 2], [40, 3]]


def test_the_smallest_product_meets_eps_and_one_row_less_does_not():
    x, heads, d = _data(), 4, 12
    g = torch.Generator().manual_seed(3)
    wq = torch.cat([torch.randn(d, 3, generator=g) @ torch.randn(3, 48, generator=g)
                    + 0.05 * torch.randn(d, 48, generator=g) for _ in range(heads)]).double()
    wk = torch.randn(heads * d, 48, generator=g).double()
    products = head_products(wq, torch.randn(heads * d, generator=g), wk, heads, _stats(x))
    form = smallest_product(products, 0.1, 8, 64)
    assert form.error <= 0.1 and 0 < sum(form.ranks) < heads * d
    assert stored_product(products, sum(form.ranks) - 1, 8, 64).error > 0.1
    assert smallest_product(products, 1e-9, 4, 64) is None  # even every row misses at NF4


def _capture(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    return seen, handle


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_at_full_rank_the_model_computes_the_same_attention(arch):
    """The new queries and keys (biases included: the query's kept, the key's dropped) put
    into the real model at every row give its outputs back."""
    import transformers

    torch.manual_seed(0)
    config = tiny_config(arch, 120)
    model = getattr(transformers, config.architectures[0])(config).eval()
    ids = torch.randint(3, 120, (4, 24))
    heads = config.num_attention_heads
    if arch == "bert":
        attn = model.encoder.layer[1].attention.self
        for lin in (attn.query, attn.key):  # biases the product must honour
            torch.nn.init.normal_(lin.bias, std=0.5)
        seen, handle = _capture(attn.query)
    else:
        attn = model.transformer.h[1].attn
        torch.nn.init.normal_(attn.c_attn.bias, std=0.5)
        seen, handle = _capture(attn.c_attn)
    with torch.no_grad():
        before = model(ids)[0]
    handle.remove()
    stats = _stats(torch.cat(seen))
    with torch.no_grad():
        if arch == "bert":
            wq, bq, wk = attn.query.weight, attn.query.bias, attn.key.weight
        else:
            w, b = attn.c_attn.weight.T, attn.c_attn.bias  # Conv1D stores (in, out)
            n = w.shape[0] // 3
            wq, bq, wk = w[:n], b[:n], w[n:2 * n]
        products = head_products(wq, bq, wk, heads, stats)
        q, k = products.factors([products.d] * heads)
        if arch == "bert":
            attn.query.weight.copy_(q[:, :-1]), attn.query.bias.copy_(q[:, -1])
            attn.key.weight.copy_(k), attn.key.bias.zero_()
        else:
            n = q.shape[0]
            attn.c_attn.weight[:, :n] = q[:, :-1].T.float()
            attn.c_attn.weight[:, n:2 * n] = k.T.float()
            attn.c_attn.bias[:n], attn.c_attn.bias[n:2 * n] = q[:, -1].float(), 0
        after = model(ids)[0]
    assert torch.allclose(after, before, atol=1e-4 * float(before.abs().max())), \
        float((after - before).abs().max())
