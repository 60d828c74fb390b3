#!/usr/bin/env bash
# The GPU measurements of the README and docs/kernels.md, one target each, on a machine with a
# CUDA GPU (they were taken on one H100), torch and triton. Logs go under ${OUT:-out/gpu}.
#   bash scripts/run_on_gpu.sh kernels   # kernel tests on the GPU, the kernel table, M=1 tuning
#   bash scripts/run_on_gpu.sh tune      # tile candidates at M=16 and M=256 (4-bit)
#   bash scripts/run_on_gpu.sh load      # random Llama-3-8B: load, prefill/decode, a bf16 profile
#   bash scripts/run_on_gpu.sh decode    # bf16 vs 4-bit decode: eager, CUDA graph, torch.compile,
#                                        # q/k/v and gate/up fused
#   bash scripts/run_on_gpu.sh quantize  # random Llama-3-8B: each method's time and memory
#   METHODS="gptq tacq" bash scripts/run_on_gpu.sh full  # the same, all 32 blocks (TaCQ: ~12
#       min); an interrupted run goes on from its saved blocks under $WORK when started again
#   bash scripts/run_on_gpu.sh e2e       # the embedded SmolLM2 through the kernels vs the torch
#                                        # path (needs the gguf package, as model.py does)
# The random Llama-3-8B checkpoint is made on first use (scripts/make_random_llama3_8b.py).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
CKPT=checkpoints/random-llama3-8b
export WORK=${WORK:-/tmp/mixq-work}
case "$1" in
kernels)
  MIXQ_TEST_GPU=1 python3 -m pytest -q -rf tests/test_kernels.py > "$OUT/gpu_tests.txt" 2>&1
  tail -1 "$OUT/gpu_tests.txt"
  python3 scripts/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.txt"
  python3 scripts/bench_kernels.py --tune --M 1 --shapes 14336x4096 4096x14336 \
    > "$OUT/tune_m1.txt" 2>&1
  grep "^|" "$OUT/tune_m1.txt" ;;
tune)  # small-batch and prefill tiles at 4 bits: does a fused GEMM now beat dequantize + cuBLAS?
  python3 scripts/bench_kernels.py --tune --M 16 256 --bits 4 --shapes 14336x4096 4096x14336 \
    > "$OUT/tune_m16_m256.txt" 2>&1
  grep "^|" "$OUT/tune_m16_m256.txt" ;;
load)
  [ -f $CKPT/model.safetensors.index.json ] || python3 scripts/make_random_llama3_8b.py > /dev/null
  for impl in mixq transformers; do
    python3 scripts/bench_load.py --ckpt $CKPT --device cuda --impl $impl 2>&1 | tail -1
  done | tee "$OUT/bench_load.txt"
  python3 scripts/bench_load.py --ckpt $CKPT --device cuda --static 2>&1 | tail -1 \
    | tee -a "$OUT/bench_load.txt"
  python3 scripts/profile_decode.py --ckpt $CKPT > "$OUT/profile_bf16.txt" 2>&1 ;;
decode)
  [ -f $CKPT/model.safetensors.index.json ] || python3 scripts/make_random_llama3_8b.py > /dev/null
  python3 scripts/bench_8b.py --ckpt $CKPT --device cuda --decode --compile --fuse 2>&1 \
    | tail -11 | tee "$OUT/decode.txt" ;;
quantize)
  [ -f $CKPT/model.safetensors.index.json ] || python3 scripts/make_random_llama3_8b.py > /dev/null
  python3 scripts/bench_8b.py --ckpt $CKPT --device cuda --methods rtn gptq quantease spqr \
    tacq resq --nsamples 128 --seqlen 2048 --layers ${LAYERS:-2} 2>&1 \
    | tee "$OUT/bench_8b.txt" | grep "^|"
  python3 scripts/bench_8b.py --ckpt $CKPT --device cuda --resume-check --layers 4 \
    --nsamples 8 2>&1 | tail -2 | tee "$OUT/resume.txt" ;;
full)
  [ -f $CKPT/model.safetensors.index.json ] || python3 scripts/make_random_llama3_8b.py > /dev/null
  python3 scripts/bench_8b.py --ckpt $CKPT --device cuda --methods ${METHODS:-gptq} \
    --nsamples 128 --seqlen 2048 --work "$WORK" 2>&1 \
    | tee -a "$OUT/bench_8b_full.txt" | grep "^|\|reusing\|resumed" ;;
e2e)
  python3 scripts/e2e_gpu.py 2>&1 | tee "$OUT/e2e.txt" ;;
*) targets="kernels|tune|load|decode|quantize|full|e2e"
   echo "usage: bash scripts/run_on_gpu.sh $targets"; exit 2 ;;
esac
