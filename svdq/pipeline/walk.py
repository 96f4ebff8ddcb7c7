"""The walk over a model's blocks: one analysis that the eps planner, the budget's two passes
and sweep all consume.

`Walker.start` captures what the first block receives; then, per block i, `enter(i)` reads
the block's weights (a streamed source: from its files, now), runs the block on the stream
its statistics come from and hands back each target layer's `LayerWork`; the caller decides
what each layer becomes; `leave(i, ...)` runs the other streams through the block as decided
and releases it. The streams:

- `main`: what the statistics are gathered on — the source model's own activations, or with
  `--sequential` those of the blocks as compressed so far (the block runs once more, through
  its compressed layers, in `leave`);
- `source`: with `--sequential --refit`, the source model's stream beside it, token for
  token, so the statistics pair the two (`LayerStats.cross`);
- variants: named streams that run through the block with other layers swapped in for the
  time of their forward (the budget's candidate plans, judged end to end).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from svdq.algo.factorize import LayerStats
from svdq.calibration.collect import Collector
from svdq.calibration.gradients import gradients
from svdq.calibration.loss import native_bf16
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.models import stream
from svdq.models import blocks as model_blocks
from svdq.models.layers import blocks_of, head_of, targets
from svdq.models.load import Source
from svdq.models.streams import Stream
from svdq.pipeline.work import Clock, LayerWork, Progress, offloaded, swapped

class Walker:
    """A model walked one block at a time (see the module's docstring)."""

    def __init__(self, source: Source, settings: Settings, report: Progress, clock: Clock,
                 scratch: Path | None = None) -> None:
        self.source, self.settings, self.report, self.clock = source, settings, report, clock
        self.device = torch.device(settings.device)
        self.streamed = source.weights is not None
        self.model = (stream.to_device(source.model, self.device) if self.streamed
                      else source.model.to(self.device))
        self.prefix, self.blocks = blocks_of(self.model)
        self.names = targets(self.model, settings.include, settings.exclude)
        self.head = head_of(self.model, self.names)  # --include'd layers after the blocks
        self.ids: torch.Tensor | None = None
        self.scratch = scratch
        self.grads: dict[str, tuple[torch.Tensor | None, float]] = {}
        self.token_g2: dict[str, torch.Tensor] = {}  # the probe's per-token ‖g‖², by layer
        self.probe = 0  # tokens the main stream's statistics keep as the probe
        self.weights: dict[str, torch.Tensor] = {}  # token weights by layer, for `weighed`
        self.weighed: torch.Tensor | None = None  # ... the ids they were taken on
        self.main: Stream | None = None
        self.kwargs: list[list[dict]] = []  # what block i receives besides hidden states, per batch
        self.paired: Stream | None = None  # --sequential --refit: the source's own stream
        self.variants: dict[str, Stream] = {}
        self.parked: set[str] | None = None  # what `outside(False)` sent to meta
        self._loaded: int | None = None  # the block whose weights were read last
        self._entered: dict[str, nn.Module] = {}  # its target layers as `enter` found them
        self._outputs: Stream | None = None  # the main stream past it, once computed
        self._paired_outputs: Stream | None = None

    # ------------------------------------------------------------------ blocks in and out
    def layers_of(self, i: int) -> dict[str, nn.Module]:
        """Block i's target layers, by name, as the model holds them now."""
        return {n: self.model.get_submodule(n) for n in self.names
                if n.startswith(f"{self.prefix}.{i}.")}

    def load(self, i: int) -> None:
        """Block i's weights, read from the source's files now (streamed sources)."""
        if self.streamed:
            stream.materialize(self.blocks[i], f"{self.prefix}.{i}", self.source.weights,
                               self.source.stream_dtype, self.device)

    def unload(self, i: int, keep: dict[str, torch.Tensor] | None = None) -> None:
        """Block i back to `meta` (streamed sources); `keep` first gets a copy of what it holds
        outside its target layers (norms, ...), which the artifact stores as they are."""
        self._loaded = None
        if self.streamed and keep is None:
            self.blocks[i].to("meta")
        elif self.streamed:
            stream.release(self.blocks[i], f"{self.prefix}.{i}", set(self.layers_of(i)), keep)
        stream.give_back(force=True)  # a block's weights and streams: always worth a trim

    def outside(self, present: bool) -> None:
        """A streamed source's tensors outside the blocks (embeddings, final norm, head) are
        read while a forward of the whole model needs them (capture, gradients, the judge,
        the writer) and on `meta` while the blocks are walked: 403 MB at TinyLlama-1.1B's
        untied vocabulary of 49152."""
        if not self.streamed or (self.parked is None) == present:
            return
        if present:
            stream.unpark(self.model, self.parked, self.source.weights, self.source.stream_dtype,
                          self.device)
            self.parked = None
        else:
            self.parked = stream.park(self.model, self.prefix, self.source.weights)

    def new_stream(self, folder: bool | None = None) -> Stream:
        """An empty stream; its hidden states rest on the CPU when the blocks run on a GPU, in
        files with `folder` (default: --offload-activations)."""
        offload = self.settings.offload_activations if folder is None else folder
        home = torch.device("cpu") if self.device.type == "cuda" else self.device
        return Stream(self.device, home, self.scratch if offload else None)

    def _offload(self, streams: int) -> bool:
        """Whether `streams` calibration streams go to files: asked for, or too large."""
        config = self.model.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
        return self.scratch is not None and offloaded(self.settings, hidden, streams)

    # ------------------------------------------------------------------ the passes
    def gradients(self, ids: torch.Tensor, fisher: bool, scale: float = 1.0,
                  sampled: bool = False, probe: int = 0, tokens: int | None = None,
                  weigh: bool = False) -> None:
        """Gradient statistics of every target layer (`calibration.gradients`; `sampled`: drawn
        labels), kept for each layer's statistics as the walk reaches it; `scale` multiplies
        them (`--fast`'s sums over some sequences stand for all; it also runs the head in
        bfloat16 where that is native, `loss.native_bf16`). `probe`: the first sequences
        whose tokens (at most `tokens` of them) the main stream's statistics keep with each
        one's own ‖g‖² (`LayerStats.probe`, `token_g2`: `pipeline.probe`). `weigh`: the
        statistics on these `ids` weigh each token by its ‖g‖² over their mean (`enter`)."""
        offload = self._offload(len(self.blocks) + 1)
        self.outside(True)
        modules = {n: self.model.get_submodule(n) for n in self.names}
        per_token: dict[str, list[torch.Tensor]] | None = {} if probe or weigh else None
        self.grads = gradients(self.model, ids, modules, self.source.is_causal, self.settings.seed,
                               self.report, fisher, self.load, self.unload,
                               lambda: self.new_stream(offload),
                               bf16=self.settings.fast and native_bf16(self.device),
                               sampled=sampled, per_token=per_token)
        self.token_g2 = {n: torch.cat(t[:probe])[:tokens] for n, t in (per_token or {}).items()
                         if probe}
        self.probe = min((len(t) for t in self.token_g2.values()), default=0)
        self.weights, self.weighed = {}, ids if weigh else None
        for n, t in per_token.items() if weigh else ():
            w = torch.cat(t)  # every token, in order; over its mean: the sums keep their scale
            if len(w) == ids.numel() and w.mean() > 0:
                self.weights[n] = w / w.mean()
        if scale != 1.0:
            self.grads = {n: (None if f is None else f * scale, g * scale)
                          for n, (f, g) in self.grads.items()}
        self.clock.lap("gradients")

    def start(self, ids: torch.Tensor, variants: tuple[str, ...] = (), main: bool = True) -> None:
        """Capture the first block's inputs: the main stream, and a copy per variant. Without
        `main` the main stream is dropped once the variants have their copies (a causal LM's
        judged `--sequential` budget without `--refit`, or its pass 2 on pass 1's statistics:
        nothing reads it, and carrying it would cost a forward per block)."""
        torch.manual_seed(self.settings.seed)
        sequential, refit = self.settings.sequential, self.settings.refit
        offload = self._offload(1 + len(variants) + (sequential and refit))
        self.main = self.new_stream(offload)
        self.outside(True)
        self.ids = ids
        early = []  # head layers that run before the blocks: not the head
        hooks = [self.model.get_submodule(n).register_forward_pre_hook(
            lambda *_, n=n: early.append(n)) for n in self.head]
        try:
            captured = model_blocks.capture(self.model, ids, self.settings.batch_size)
        finally:
            for hook in hooks:
                hook.remove()
        if early:
            raise SvdqError(f"--include matches {early[0]}, which runs before the blocks (an "
                            "embedding or stem); svdq compresses the blocks' layers and the "
                            "head's after them, and the token embedding with --embed-bits 4|8")
        self.outside(False)
        for h in captured.hidden:
            self.main.append(h)
        self.kwargs = captured.kwargs
        # a judged --sequential budget pairs each candidate with the main stream (the source's)
        self.paired = self.main.copy() if sequential and refit and not variants else None
        self.variants = {label: self.main.copy() for label in variants}
        if not main:
            self.main.drop()
            self.main = None
        self.clock.lap("calibration images" if ids.is_floating_point() else "calibration text")

    def enter(self, i: int, label: str | None = None,
              stats: dict[str, LayerStats] | None = None) -> list[LayerWork]:
        """Read block i, run the main stream through it gathering its layers' statistics, and
        return their work, in model order. With `label` the statistics come from that
        variant's stream instead (a `--sequential` budget: each candidate plan calibrated on
        its own compressed blocks; the block's own layers are in the model, the outputs are
        dropped and `leave` carries the streams on); `--refit` pairs it with the main stream,
        which is then the source's own. With `stats` (pass 1's, `pipeline.kept`) nothing runs.
        The block is read once however often it is entered."""
        stage = lambda what: self.report(f"blocks: block {i + 1}: {what}", i, len(self.blocks))  # noqa: E731
        if self.streamed and self._loaded != i:
            stage("reading its weights")
            self.load(i)
        self._loaded = i
        stage("forward and statistics" + (f" ({label})" if label else ""))
        block, mine = self.blocks[i], self.layers_of(i)
        self._entered = mine
        weights = {} if self.weighed is None or not torch.equal(self.ids, self.weighed) else \
            {n: self.weights[n] for n in mine if n in self.weights}  # the tokens they came from
        if label is not None:
            source = self.main if self.settings.refit else None
            with Collector(mine, paired=source is not None, weights=weights) as collector:
                for j, h in enumerate(self.variants[label]):
                    kw = self.kwargs[i][j]
                    if source is not None:
                        with collector.source():
                            model_blocks.run_block(block, source[j], kw)
                    model_blocks.run_block(block, h, kw)
            self._outputs = self._paired_outputs = None
            self.clock.lap("forward and statistics")
            return self._works(mine, collector.stats)
        if stats is not None:  # a main stream, if any, is carried on by `leave`
            self._outputs = self._paired_outputs = None
            return self._works(mine, stats)
        outputs, paired = self.main.like(), None if self.paired is None else self.paired.like()
        with Collector(mine, paired=paired is not None, probe=self.probe,
                       weights=weights) as collector:
            for j, h in enumerate(self.main):
                kw = self.kwargs[i][j]
                if paired is not None:  # the block is still the source's here
                    with collector.source():
                        paired.append(model_blocks.run_block(block, self.paired[j], kw))
                outputs.append(model_blocks.run_block(block, h, kw))
        self._outputs, self._paired_outputs = outputs, paired
        self.clock.lap("forward and statistics")
        return self._works(mine, collector.stats)

    def _works(self, mine: dict[str, nn.Module], stats: dict[str, LayerStats]) -> list[LayerWork]:
        works = []
        for name, module in mine.items():
            st = stats[name]  # on the device already where pass 1 kept them (`Kept.get`)
            st.gram, st.total = st.gram.to(self.device), st.total.to(self.device)
            if name in self.grads:
                fisher, grad2 = self.grads[name]
                st.row_fisher = None if fisher is None else fisher.to(self.device)
                st.grad2 = grad2
            if st.probe is not None and name in self.token_g2:  # the same tokens, in order
                n = min(len(st.probe), len(self.token_g2[name]))
                st.probe, st.token_g2 = st.probe[:n], self.token_g2[name][:n].to(self.device)
            bias = None if module.bias is None else module.bias.detach().float()
            works.append(LayerWork(name, module, None, bias, st,
                                   self.settings.method))
        return works

    def enter_head(self, label: str | None = None,
                   stats: dict[str, LayerStats] | None = None) -> list[LayerWork]:
        """The head's target layers (`--include`d, after the blocks) with their statistics,
        gathered by running the main stream — the last block's outputs — through the
        model's own head one sample at a time (`label`: that variant's stream instead;
        `stats`: pass 1's, nothing run); none where no head layer is a target."""
        if not self.head:
            return []
        self.report("head: forward and statistics", len(self.blocks), len(self.blocks))
        self.outside(True)
        mine = {n: self.model.get_submodule(n) for n in self.head}
        if stats is not None:
            return self._works(mine, stats)
        row = 0
        with Collector(mine) as collector, model_blocks.tail(self.model) as cell, \
                torch.no_grad():
            for h in (self.main if label is None else self.variants[label]):
                for k in range(h.shape[0]):
                    cell["value"] = h[k: k + 1]
                    self.model(**model_blocks.inputs(self.ids[row: row + 1].to(h.device)))
                    row += 1
        self.clock.lap("forward and statistics")
        return self._works(mine, collector.stats)

    def leave(self, i: int, variants: dict[str, dict[str, nn.Module]] | None = None,
              keep: dict[str, torch.Tensor] | None = None) -> None:
        """Carry the streams past block i and release it. With `--sequential` the main stream
        runs again, through the layers swapped into the model since `enter`; each variant runs
        with its own layers (`variants[label]`: {name: module}) swapped in for its forward."""
        block = self.blocks[i]
        changed = any(self.model.get_submodule(n) is not m for n, m in self._entered.items())
        if self.main is not None and (self._outputs is None
                                      or (self.settings.sequential and changed)):
            if self._outputs is not None:
                self._outputs.drop()
            self._outputs = self.main.like()
            for j, h in enumerate(self.main):
                self._outputs.append(model_blocks.run_block(block, h, self.kwargs[i][j]))
            self.clock.lap("forward and statistics")
        for label, layers in (variants or {}).items():
            with swapped(self.model, layers):
                out = self.variants[label].like()
                for j, h in enumerate(self.variants[label]):
                    out.append(model_blocks.run_block(block, h, self.kwargs[i][j]))
            self.variants[label].drop()
            self.variants[label] = out
        if self.main is not None:
            self.main.drop()
            self.main = self._outputs
        if self.paired is not None:
            self.paired.drop()
            self.paired = self._paired_outputs
        self._outputs = self._paired_outputs = None
        self.unload(i, keep)
        self.report(f"blocks: {'done' if i + 1 == len(self.blocks) else f'block {i + 2}'}",
                    i + 1, len(self.blocks))

    def close(self) -> None:
        for s in [self.main, self.paired, *self.variants.values()]:
            if s is not None:
                s.drop()

