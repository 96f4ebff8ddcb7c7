"""Where a model keeps its attention queries and keys: the module names of each (query, key)
pair inside a block, GPT-2's fused q/k/v layer, the head count, and whether the model rotates
queries and keys by position (rotary embeddings: then W_Q,hᵀ W_K,h is not one matrix). Read by
`svdq spectrum` and by `--attention-product`.
"""
from __future__ import annotations

from torch import nn

# (query, key) module names inside a block; GPT-2 keeps q, k and v in one Conv1D
PAIRS = (("attention.self.query", "attention.self.key"),  # BERT, MiniLM
         ("attention.attention.query", "attention.attention.key"),  # ViT (transformers 4)
         ("attention.q_proj", "attention.k_proj"),  # ViT (transformers 5)
         ("attention.attn.q", "attention.attn.k"),  # MPNet
         ("self_attn.q_proj", "self_attn.k_proj"))  # Llama-family (rotary: refused)
FUSED = "attn.c_attn"  # GPT-2


def rotary(model: nn.Module) -> bool:
    return any("rotary" in type(m).__name__.lower() for m in model.modules())


def heads(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)


def why_not(model: nn.Module) -> str | None:
    """Why the attention product does not apply to `model` (from its config and module names),
    or None where it may."""
    if heads(model) is None:
        return f"{type(model).__name__} has no attention heads"
    if rotary(model):
        return (f"{type(model).__name__} rotates queries and keys by position (rotary "
                "embeddings), so W_Q,h W_K,hᵀ is not one matrix")
    suffixes = tuple("." + q for q, _ in PAIRS) + ("." + FUSED,)
    if not any(name.endswith(suffixes) for name, _ in model.named_modules()):
        return f"svdq does not know where {type(model).__name__}'s queries and keys are"
    return None
