"""Timing: one forward and backward of the causal distillation loss with the whole logits and
in chunks of 64 and 256 MB, twice each, in one process (the student a copy of the source with
its norms training; the loss is 0, the work is a fine-tuning step's KL).

    python benchmarks/finetune_chunks.py "$(svdq assets gemma3)" gemma-3-270m-q4_k_m.gguf

Results: benchmarks/results/finetune_chunks/ (with the `svdq finetune` peak-memory runs).
"""
import copy
import sys
import time

import torch
import transformers

from svdq.recovery import losses, tuned

path = sys.argv[1]
teacher = tuned.float32(transformers.AutoModelForCausalLM.from_pretrained(
    path, gguf_file=sys.argv[2]) if len(sys.argv) > 2 else None)
teacher.eval()
student = copy.deepcopy(teacher)
for n, p in student.named_parameters():
    p.requires_grad_("norm" in n)
ids = torch.randint(0, 1000, (4, 256), generator=torch.Generator().manual_seed(0))
keeps = losses.keeps_logits
for label, size, chunked in (("whole", None, False), ("chunk64", 64 << 20, True),
                             ("chunk256", 256 << 20, True)) * 2:
    losses.keeps_logits = keeps if chunked else (lambda m: False)
    if size:
        losses.LOGIT_BYTES = size
    t = time.perf_counter()
    loss = losses.distill_loss(student, teacher, ids, True, backward=True)
    student.zero_grad(set_to_none=True)
    print(label, round(time.perf_counter() - t, 1), float(loss), flush=True)
