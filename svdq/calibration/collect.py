"""Per-layer input statistics, accumulated by forward pre-hooks while a block runs.

A convolution's statistics are those of its unfolded input patches (in·kh·kw columns, one
row per output position: `torch.nn.functional.unfold` with its geometry), made a few images
at a time (`PATCHES` values at most), so its calibration error is as exact as a linear layer's.

Memory is what bounds a walk over a big model, so the sums go straight into float64
accumulators, from float32 products of `CHUNK` tokens × `COLUMNS` columns at a time (no
full-size float64 copy of a batch or of its product, no second Gram per batch; a Gram's upper
triangle only, mirrored when read), and layers fed the same tensor (q, k and v; gate and
up) share one set of accumulators instead of holding equal copies.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, Iterator

import torch
from torch import nn

from svdq.algo.factorize import LayerStats
from svdq.errors import SvdqError
from svdq.runtime import conv_of

CHUNK = 2048  # tokens per float32 partial product
COLUMNS = 512  # accumulator columns per partial product (adding float32 into float64 copies it)
SYMMETRIC = 128  # a Gram's columns per partial product: the upper triangle's blocks only
PATCHES = 2 ** 24  # float32 values of unfolded convolution patches made at once (64 MB)


def rows(x: torch.Tensor, conv: dict | None) -> Iterator[torch.Tensor]:
    """A layer's input as float32 rows (positions × in), in pieces: a linear layer's tokens at
    once, a convolution's unfolded patches a few images at a time."""
    if conv is None:
        yield x.detach().reshape(-1, x.shape[-1]).float()
        return
    x = x.detach()
    one = conv["in_channels"] * math.prod(conv["kernel"])
    out_hw = [(x.shape[2 + d] + 2 * conv["padding"][d] - conv["dilation"][d]
               * (conv["kernel"][d] - 1) - 1) // conv["stride"][d] + 1 for d in (0, 1)]
    step = max(1, PATCHES // max(1, one * out_hw[0] * out_hw[1]))
    for i in range(0, x.shape[0], step):
        cols = nn.functional.unfold(x[i: i + step].float(), conv["kernel"], conv["dilation"],
                                    conv["padding"], conv["stride"])  # (b, in·kh·kw, positions)
        yield cols.transpose(1, 2).reshape(-1, one)


def _add_products(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += aᵀ b (tokens × in each), in float64 from float32 products of at most CHUNK
    tokens × COLUMNS columns, so no temporary is larger than a slice of the accumulator.
    Where `b` is `a` (a Gram) only the upper triangle's blocks are made, SYMMETRIC columns at
    a time (4096 tokens on 2 cores: 9.7 ms against 15.5 at 576 inputs, 66 against 105 at 1536;
    `benchmarks/kernel_speed.py`):
    `mirrored` fills the rest."""
    gram = b is a
    step = SYMMETRIC if gram else COLUMNS
    for i in range(0, a.shape[0], CHUNK):
        at, bi = a[i: i + CHUNK].T, b[i: i + CHUNK]
        for j in range(0, acc.shape[1], step):
            top = j + step if gram else acc.shape[0]  # rows below the block: its mirror
            acc[:top, j: j + step].add_(at[:top] @ bi[:, j: j + step])


def mirrored(gram: torch.Tensor) -> torch.Tensor:
    """`gram` with its strict lower triangle copied from its upper one, as `_add_products`
    leaves it: exactly symmetric (in place, a band of SYMMETRIC rows at a time: no second
    n × n matrix; in inference mode where the accumulator was made in it)."""
    with torch.inference_mode(gram.is_inference()):
        for j in range(0, gram.shape[0], SYMMETRIC):
            gram[j: j + SYMMETRIC, :j] = gram[:j, j: j + SYMMETRIC].T
            block = gram[j: j + SYMMETRIC, j: j + SYMMETRIC]
            block.copy_(torch.triu(block) + torch.triu(block, 1).T)
    return gram


class Collector:
    """Forward hooks that accumulate LayerStats for each named module while forwards run.

    With `paired`, each forward on the compressed stream is preceded by one of the source model
    on the source stream, run inside `source()`: the inputs seen there are not accumulated but
    held until the next forward, which adds Σ x̃ x₀ᵀ (`LayerStats.cross`), Σ x₀ x₀ᵀ and Σ x₀
    (x̃ the layer's input on the compressed stream, x₀ on the source stream, token for token).
    With `probe`, a linear layer's first `probe` input rows are kept as well
    (`LayerStats.probe`: the first tokens of the first sequences, in order). With `weights`
    ({name: (tokens,) float}, one per row the layer will see, in order), that linear layer's
    sums weigh each row: Σ w_t x_t x_tᵀ, Σ w_t x_t (`LayerStats.weighted`); it then shares
    no accumulators.
    """

    def __init__(self, modules: dict[str, nn.Module], paired: bool = False,
                 probe: int = 0, weights: dict[str, torch.Tensor] | None = None) -> None:
        self.modules, self.paired, self.probe = modules, paired, probe
        self.weights = weights or {}
        self._acc: dict[str, LayerStats] = {}  # by the name of the layer that accumulates
        self._leader: dict[str, str] = {}  # each layer -> whose accumulators it shares
        self._last: tuple = ()  # (input, its version, held, name) last accumulated
        self._held: dict[str, torch.Tensor] = {}  # source-stream inputs awaiting their pair
        self._recording = False
        self._handles: list = []

    def __enter__(self) -> "Collector":
        self._handles = [m.register_forward_pre_hook(self._hook_for(n))
                         for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._last = ()
        self._held.clear()

    @property
    def stats(self) -> dict[str, LayerStats]:
        """One LayerStats per layer; layers that shared an input share its tensors."""
        out = {}
        for name in self.modules:
            if name in self._leader:
                acc = self._acc[self._leader[name]]
                out[name] = LayerStats(mirrored(acc.gram), acc.total, acc.tokens, acc.abs_total,
                                       cross=acc.cross, source_gram=None if acc.source_gram is None
                                       else mirrored(acc.source_gram),
                                       source_total=acc.source_total, cache=acc.cache,
                                       probe=acc.probe, weighted=name in self.weights)
        return out

    @contextlib.contextmanager
    def source(self) -> Iterator[None]:
        """Forwards in here are the source stream's: held for pairing, not accumulated."""
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def _accumulate(self, name: str, src: torch.Tensor, held: torch.Tensor | None) -> None:
        conv = conv_of(self.modules[name])
        if held is not None and held.shape != src.shape:
            raise SvdqError("the source and compressed streams disagree in shape; "
                            "this model cannot be calibrated with --sequential --refit")
        pieces = zip(rows(src, conv), rows(held, conv) if held is not None else itertools.repeat(None))
        for x, x0 in pieces:
            st = self._acc.get(name)
            if st is None:
                n = x.shape[1]
                zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=x.device)  # noqa: E731
                st = self._acc[name] = LayerStats(zeros(n, n), zeros(n), 0, zeros(n))
                if held is not None:
                    st.cross, st.source_gram, st.source_total = zeros(n, n), zeros(n, n), zeros(n)
            have = 0 if st.probe is None else st.probe.shape[0]
            if conv is None and have < self.probe:  # the first tokens, kept as they are
                more = x[: self.probe - have].clone()
                st.probe = more if st.probe is None else torch.cat([st.probe, more])
            rows_in, root = x.shape[0], None
            if name in self.weights:  # each row times √w_t: Σ w_t x_t x_tᵀ from the same products
                w = self.weights[name][st.tokens: st.tokens + rows_in]
                if len(w) != rows_in:
                    raise RuntimeError(f"{name}: more input rows than token weights")
                root = w.to(x.device, x.dtype).sqrt()[:, None]
                x, x0 = x * root, None if x0 is None else x0 * root
            _add_products(st.gram, x, x)
            again = lambda t: t if root is None else t * root  # noqa: E731  (√w · √w x = w x)
            st.total += again(x).sum(0)
            st.abs_total += again(x.abs()).sum(0)
            st.tokens += rows_in
            if x0 is not None:
                _add_products(st.cross, x, x0)
                _add_products(st.source_gram, x0, x0)
                st.source_total += again(x0).sum(0)

    def _hook_for(self, name: str) -> Callable:
        def hook(module, args):
            if self._recording:
                self._held[name] = args[0]
                return
            held = self._held.pop(name, None) if self.paired else None
            if self.paired and held is None:
                raise RuntimeError(f"{name}: a compressed-stream forward without its source one")
            src = args[0]
            # the same tensor object, unmodified since (a data_ptr alone can be recycled)
            version = None if src.is_inference() else src._version
            shared = bool(self._last) and self._last[0] is src and \
                self._last[1] == version and self._last[2] is held and \
                conv_of(self.modules[self._last[3]]) == conv_of(module) and \
                name not in self.weights
            leader = self._leader.setdefault(
                name, self._leader[self._last[3]] if shared else name)
            if (leader != name) != shared:
                raise RuntimeError(f"{name}: its input is shared with other layers in one batch "
                                   "and not in another")
            if leader == name:
                self._accumulate(name, src, held)
                if name not in self.weights:  # a weighted layer's sums are its own
                    self._last = (src, version, held, name)
        return hook


@contextlib.contextmanager
def collect(modules: dict[str, nn.Module]) -> Iterator[dict[str, LayerStats]]:
    """Accumulate LayerStats for each named module while the body runs forwards; the dict
    is filled when the body ends."""
    out: dict[str, LayerStats] = {}
    with Collector(modules) as collector:
        try:
            yield out
        finally:
            out.update(collector.stats)

