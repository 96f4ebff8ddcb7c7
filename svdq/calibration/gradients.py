"""Gradient statistics of the target layers, computed one block at a time.

Per layer: grad2 = Σ_t ‖∂L_s/∂y_t‖² over every sample's tokens (y_t the layer's output for
token t): the budget's sensitivity; with `per_token`, each token's own ‖∂L_s/∂y_t‖² too
(a budget weighs each token's error by it: `pipeline.probe`); and with `fisher`, row_fisher (float64, (out,)) =
Σ_s Σ_j (∂L_s/∂W_ij)², the diagonal empirical Fisher summed over each row of W (out, in):
`--method fisher`'s row weights. Per-sample gradients: one sequence per backward.

The loss L_s of a sample: for a causal LM the mean next-token cross-entropy (as transformers
computes it for labels=ids), or with `sampled` (budgets' sensitivities) against labels drawn
from the model's own next-token distributions — then E[grad grad^T] is the Fisher information,
the loss's curvature (Gauss–Newton), where the text's tokens give the empirical Fisher, a
biased stand-in for it (Kunstner et al. 2019; `row_fisher` then follows the drawn labels
too); for an image classifier the cross-entropy against its own top-1 class. Otherwise (an
encoder) a random-projection surrogate, L_s = mean_t rᵀ h_t over the last hidden states h_t
with r ~ N(0, I) drawn per sample from a generator seeded by `seed`: since E_r[r rᵀ] = I,
E_r[(∂L/∂y)(∂L/∂y)ᵀ] = J Jᵀ / T² (J the Jacobian of the final hidden states in y) is the
Gauss–Newton matrix of the output, so grad2 measures how far an error in the layer's output
moves the final hidden states.

Nothing needs the whole model in memory: a forward walk keeps each block's inputs (the
`boundaries`, in memory or offloaded to files), the head turns the last block's outputs into
∂L/∂h, and a backward walk, last block first, recomputes each block's forward from its inputs
and backpropagates ∂L/∂h through it (gradient checkpointing at block granularity). Only the
hidden states of one sample and its gradient take part in autograd besides, with `fisher`,
the target weights; every parameter's requires_grad is restored and hooks removed, whatever
happens.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from svdq.calibration.loss import bf16_head, class_logits, final_states, token_loss
from svdq.errors import SvdqError
from svdq.models import blocks as model_blocks
from svdq.models.blocks import capture, tail
from svdq.models.layers import blocks_of, conv1d_type
from svdq.models.streams import Stream


def gradients(model: nn.Module, ids: torch.Tensor, modules: dict[str, nn.Module], causal: bool,
              seed: int, report: Callable[[str, int, int], None] | None = None,
              fisher: bool = True, load: Callable[[int], None] | None = None,
              unload: Callable[[int], None] | None = None,
              new_stream: Callable[[], Stream] | None = None, bf16: bool = False,
              sampled: bool = False, per_token: dict[str, list[torch.Tensor]] | None = None,
              ) -> dict[str, tuple[torch.Tensor | None, float]]:
    """{name: (row_fisher, or None without `fisher`; grad2)} for the target layers `modules`.
    `per_token`: filled with {name: [each sample's ‖∂L_s/∂y_t‖² by token, float32 (T,)]}
    for the layers whose outputs are (1, T, out) per sample, samples in the order of `ids`.

    By default the model is whole in memory; a walk over a streamed source passes `load(i)` /
    `unload(i)`, which bring block i's weights in and out, and `new_stream()`, an empty
    `models.streams.Stream` for the block inputs kept between the two walks (in files
    where they are large). `bf16`: a causal LM's head in bfloat16 (`loss.bf16_head`) unless
    a layer of the head is a target. `sampled`: a causal LM's labels drawn from its own
    next-token distributions (`loss.draw`, seeded by `seed`) instead of the text's next tokens."""
    report = report or (lambda stage, done, total: None)
    if causal and ids.shape[1] < 2:
        raise SvdqError("gradient statistics of a causal LM need calibration sequences of at "
                        "least 2 tokens (a next token to predict); raise --calib-len")
    prefix, blocks = blocks_of(model)
    load, unload = load or (lambda i: None), unload or (lambda i: None)
    if new_stream is None:
        device = next(p for p in model.parameters() if p.device.type != "meta").device
        new_stream = lambda: Stream(device)  # noqa: E731
    n = len(blocks)
    steps, done = 2 * n + 1, 0
    report("gradients", 0, steps)
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    out: dict[str, tuple[torch.Tensor | None, float]] = {}
    boundaries: list[Stream] = []
    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
            p.grad = None
        stream = new_stream()
        captured = capture(model, ids, 1)  # one sample per entry
        for h in captured.hidden:
            stream.append(h)
        for i, block in enumerate(blocks):  # forward: keep every block's inputs
            boundaries.append(stream)
            load(i)
            stream = new_stream()
            for s, h in enumerate(boundaries[-1]):
                stream.append(model_blocks.run_block(block, h, captured.kwargs[i][s]))
            unload(i)
            done += 1
            report("gradients", done, steps)
        head = {k: m for k, m in modules.items() if not k.startswith(prefix + ".")}
        with _watching(head, fisher, out, per_token), bf16_head(model, bf16 and not head):
            grads = _head(model, stream, ids, causal, seed, sampled)  # and --include'd head layers
        stream.drop()
        done += 1
        report("gradients", done, steps)
        for i in reversed(range(n)):  # backward: last block first
            load(i)
            mine = {k: m for k, m in modules.items() if k.startswith(f"{prefix}.{i}.")}
            grads = _backward(blocks[i], boundaries[i], captured.kwargs[i], grads, mine, fisher,
                              out, per_token)
            boundaries[i].drop()
            unload(i)
            done += 1
            report("gradients", done, steps)
    finally:
        for stream in boundaries:
            stream.drop()
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
    return out


def _head(model: nn.Module, last: Stream, ids: torch.Tensor, causal: bool,
          seed: int, sampled: bool = False) -> list[torch.Tensor]:
    """∂L_s/∂h for each sample s, h the last block's outputs."""
    generator = torch.Generator().manual_seed(seed)
    drawn = None  # the generator of a causal LM's drawn labels (`sampled`)
    grads = []
    model.eval()
    with tail(model) as cell, torch.enable_grad():
        for s, h in enumerate(last):
            h = h.detach().requires_grad_(True)
            sample = ids[s: s + 1].to(h.device)
            if sample.is_floating_point():  # images: cross-entropy to the own top-1 class
                logits = class_logits(model, cell, h, sample)
                nn.functional.cross_entropy(logits, logits.detach().argmax(-1)).backward()
            elif causal:
                if sampled and drawn is None:  # on the device the logits are on
                    drawn = torch.Generator(h.device).manual_seed(seed)
                token_loss(model, cell, h, sample, backward=True, drawn=drawn)
            else:
                states = final_states(model, cell, h, sample)
                r = torch.randn(states.shape[-1], generator=generator, dtype=torch.float64)
                (states @ r.to(states.device, states.dtype)).mean().backward()
            grads.append(h.grad.detach())
    return grads


@contextlib.contextmanager
def _watching(modules: dict[str, nn.Module], fisher: bool,
              out: dict[str, tuple[torch.Tensor | None, float]],
              per_token: dict[str, list[torch.Tensor]] | None = None) -> Iterator[None]:
    """While the body runs backward passes, accumulate the statistics of `modules` (hooks on
    their outputs and, with `fisher`, their weights' gradients); into `out` at the end, each
    sample's per-token ‖g_t‖² into `per_token` as they come."""
    conv1d = conv1d_type()
    transposed = {n: conv1d is not None and isinstance(m, conv1d) for n, m in modules.items()}
    rows = {n: (m.weight.shape[-1] if transposed[n] else m.weight.shape[0]) for n, m in modules.items()}
    row_fisher = {n: torch.zeros(rows[n], dtype=torch.float64, device=m.weight.device)
                  for n, m in modules.items()} if fisher else {}
    grad2 = {n: torch.zeros((), dtype=torch.float64, device=m.weight.device) for n, m in modules.items()}

    def output_hook(name: str) -> Callable:
        def accumulate(g: torch.Tensor) -> None:  # returns None: the gradient flows on unchanged
            grad2[name].add_(g.detach().double().pow(2).sum())
            if per_token is not None and g.dim() == 3 and g.shape[0] == 1:
                per_token.setdefault(name, []).append(g.detach()[0].float().pow(2).sum(-1).cpu())

        def hook(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            if y.requires_grad:
                y.register_hook(accumulate)
        return hook

    def weight_hook(name: str) -> Callable:
        def hook(param):
            g = param.grad.detach()
            g2 = g.double().pow(2)
            row_fisher[name] += g2.sum(0) if transposed[name] else g2.reshape(len(g2), -1).sum(1)
            param.grad = None  # read once, never accumulated across samples
        return hook

    handles = []
    try:
        for n, m in modules.items():
            handles.append(m.register_forward_hook(output_hook(n)))
            if fisher:
                m.weight.requires_grad_(True)
                handles.append(m.weight.register_post_accumulate_grad_hook(weight_hook(n)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for m in modules.values():
            m.weight.requires_grad_(False)
            m.weight.grad = None
    for n in modules:
        out[n] = (row_fisher.get(n), float(grad2[n]))


def _backward(block: nn.Module, inputs: Stream, kwargs: list[dict], grads: list[torch.Tensor],
              modules: dict[str, nn.Module], fisher: bool,
              out: dict[str, tuple[torch.Tensor | None, float]],
              per_token: dict[str, list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
    """Backpropagate each sample's ∂L/∂(block output) through `block`, accumulating the
    statistics of `modules` into `out`; returns ∂L/∂(block input) per sample."""
    new = []
    with _watching(modules, fisher, out, per_token), torch.enable_grad():
        for h, kw, g in zip(inputs, kwargs, grads):
            h = h.detach().requires_grad_(True)
            model_blocks.call_block(block, h, kw).backward(g.to(h.device, h.dtype))
            new.append(h.grad.detach())
    return new
