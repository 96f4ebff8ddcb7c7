#!/bin/bash
# An artifact in GPU memory: a SmolLM2-shaped model (random weights, so speed and memory only;
# no checkpoint travels to the GPU machine) compressed on the GPU at NF4 and 8 bits, then
# runtime_speed.py on each against the source and bitsandbytes' own modules.
#   TOK=tokenizer-dir CALIB=text-file OUT=results-dir bash benchmarks/gpu_runtime.sh
# (results/runtime_speed_cuda_{nf4,int8}.md: session 7, one H200, from a device checkout)
set -e
TOK=${TOK:?a tokenizer folder (SmolLM2's)} CALIB=${CALIB:?a calibration text} OUT=${OUT:-benchmarks/results}
python3 - "$TOK" <<'PY'
import sys, torch, transformers
cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=1,
    eos_token_id=2, architectures=["LlamaForCausalLM"])
torch.manual_seed(0)
transformers.LlamaForCausalLM(cfg).save_pretrained("/tmp/src")
transformers.AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained("/tmp/src")
PY
for b in 4 8; do
  svdq compress /tmp/src --eps 0.3 --bits $b --device cuda --calib "$CALIB" --calib-samples 16 -o /tmp/a$b --overwrite
done
python3 benchmarks/runtime_speed.py /tmp/a4 --device cuda --dtype bfloat16 --text "$CALIB" \
  --variants stored,dequantized,source-fp32,source-bf16,bnb-nf4 --out "$OUT" --tag cuda_nf4
python3 benchmarks/runtime_speed.py /tmp/a8 --device cuda --dtype bfloat16 --text "$CALIB" \
  --variants stored,bnb-int8 --repeats 2 --out "$OUT" --tag cuda_int8
