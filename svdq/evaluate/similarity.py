"""Output similarity: cosine of two models' mean-pooled sentence embeddings."""
from __future__ import annotations


import torch
from torch import nn

from svdq.errors import SvdqError
from svdq.evaluate.perplexity import check_options, max_context, read_text


def read_lines(spec: str) -> list[str]:
    """The non-empty lines of a UTF-8 file (one sentence each) for `--similarity`."""
    if spec == "wikitext":
        raise SvdqError("--similarity takes a file of sentences, one per line, not wikitext")
    text, _ = read_text(spec)
    return [line.strip() for line in text.splitlines() if line.strip()]


def embed(model: nn.Module, tokenizer, lines: list[str], batch_size: int = 16,
          max_length: int | None = None) -> torch.Tensor:
    """(len(lines), hidden) float64: the attention-mask weighted mean of the last hidden states.

    Encoders give last_hidden_state; causal LMs their last entry of hidden_states (after the
    final norm), which works the same way. Each line is tokenized alone (special tokens
    included) and padded here, so no tokenizer needs a pad token.
    """
    limit = max_length or max_context(model) or 512
    device = next(model.parameters()).device
    enc = [tokenizer(line, truncation=True, max_length=limit)["input_ids"] for line in lines]
    out = []
    with torch.inference_mode():
        for i in range(0, len(enc), batch_size):
            chunk = enc[i: i + batch_size]
            width = max(len(c) for c in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, c in enumerate(chunk):  # right padding: causal models ignore what follows
                ids[row, :len(c)] = torch.tensor(c, dtype=torch.long)
                mask[row, :len(c)] = 1
            res = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        output_hidden_states=True)
            hidden = getattr(res, "last_hidden_state", None)
            hidden = res.hidden_states[-1] if hidden is None else hidden
            m = mask.to(device).unsqueeze(-1).double()
            out.append(((hidden.double() * m).sum(1) / m.sum(1).clamp(min=1)).cpu())
    return torch.cat(out)


def similarity(model_a: nn.Module, model_b: nn.Module, tokenizer, lines: list[str],
               batch_size: int = 16) -> dict:
    """Cosine similarity of the two models' mean-pooled embeddings, line by line."""
    if not lines:
        raise SvdqError("the similarity file has no non-empty lines; give one sentence per line")
    check_options(None, None, 0, batch_size, "cpu")
    states = []
    for model in (model_a, model_b):
        was_training = model.training
        model.eval()
        try:
            states.append(embed(model, tokenizer, lines, batch_size))
        finally:
            model.train(was_training)
    cos = torch.nn.functional.cosine_similarity(states[0], states[1], dim=-1)
    return {"mean": cos.mean().item(), "min": cos.min().item(),
            "p5": torch.quantile(cos, 0.05).item(), "n": len(lines)}


