#!/usr/bin/env bash
# Every GPU measurement in the README, in the order they were taken (one H100 through the
# device tool; the machine has torch and triton but not gguf, so nothing here needs the
# embedded SmolLM2). Writes logs under ${OUT:-out/gpu}.
#   bash scripts/run_on_gpu.sh kernels   # kernel tests on the GPU, the kernel table, M=1 tuning
#   bash scripts/run_on_gpu.sh tune      # tile candidates at M=16 and M=256 (4-bit)
#   bash scripts/run_on_gpu.sh load      # random Llama-3-8B: load, prefill/decode, a bf16 profile
#   bash scripts/run_on_gpu.sh decode    # bf16 vs 4-bit decode: eager, CUDA graph, torch.compile,
#                                        # q/k/v and gate/up fused
#   bash scripts/run_on_gpu.sh quantize  # random Llama-3-8B: each method's time and memory
#   METHODS="gptq tacq" bash scripts/run_on_gpu.sh full  # the same, all 32 blocks; a run cut
#       by the device's 10-minute limit goes on from its saved blocks (under $WORK, not $OUT,
#       which the device empties before each call) when called again while the machine is warm.
#       TaCQ at 8B: ~8 min until its masks are saved, then ~4 min of blocks: two calls
# The end-to-end check (scripts/e2e_gpu.py) needs the embedded SmolLM2 GGUF (98 MB, over the
# device tool's 64 MiB per call) and the gguf package (not on the device). Here, once:
#   bash scripts/run_on_gpu.sh e2e-prep  # the GGUF in two parts under .carry/a and .carry/b,
#                                        # the gguf wheel in .whl (both git-ignored)
# then two device calls back to back (the machine keeps /tmp while it stays warm):
#   carry .carry/a:        bash scripts/run_on_gpu.sh e2e-part1
#   carry .carry/b, .whl:  bash scripts/run_on_gpu.sh e2e
# A run longer than one call (TaCQ at 8B: ~12 min) goes in the background, in a process session
# of its own, which the device keeps running after the call returns for as long as the machine
# stays held, i.e. while calls follow each other within its 30 s idle release:
#   METHODS=tacq bash scripts/run_on_gpu.sh bg full   # starts it (targets run one by one);
#                                                     # logs under $WORK/bg
#   bash scripts/run_on_gpu.sh wait                   # waits up to ${WAIT:-560} s, then copies
#                                                     # the logs to $OUT; call again until done
# One session's 30 device minutes, calls back to back, in order of what is still missing:
# `python3 scripts/make_random_llama3_8b.py; METHODS=tacq bash scripts/run_on_gpu.sh bg full;
# bash scripts/run_on_gpu.sh wait`, then `wait` until it is done (~13 min in all; the e2e pair
# fits in while it waits: that check compares outputs, not times), then `kernels`, then `tune`
# (the M = 16 and M = 256 tiles), then `METHODS="quantease resq"` bg full and wait (~11 min).
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
  python3 scripts/bench_kernels.py --tune --M 1 --shapes 14336x4096 4096x14336 > "$OUT/tune_m1.txt" 2>&1
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
bg)
  shift; mkdir -p "$WORK/bg"; rm -f "$WORK/bg/done"
  setsid nohup bash -c 'for t in "$@"; do OUT="$WORK/bg" bash scripts/run_on_gpu.sh "$t"; done
                        touch "$WORK/bg/done"' _ "$@" > "$WORK/bg/log" 2>&1 < /dev/null &
  echo "started in the background: $*" ;;
wait)
  for ((i = 0; i < ${WAIT:-560}; i += 5)); do [ -f "$WORK/bg/done" ] && break; sleep 5; done
  cp "$WORK"/bg/* "$OUT"/; tail -20 "$WORK/bg/log"
  if [ -f "$WORK/bg/done" ]; then echo "background run: done"
  else echo "background run: going on"; fi ;;
e2e-prep)  # on this machine, not the device
  mkdir -p .carry/a .carry/b .whl
  split -b 50000000 "$(python3 -c 'import model; print(model.embedded_gguf())')" .carry/smolpart.
  mv .carry/smolpart.aa .carry/a/ && mv .carry/smolpart.ab .carry/b/
  python3 -m pip download -q --no-deps gguf==0.19.0 -d .whl ;;
e2e-part1)
  mkdir -p /tmp/mixq-smol && cp .carry/a/smolpart.aa /tmp/mixq-smol/ ;;
e2e)
  cat /tmp/mixq-smol/smolpart.aa .carry/b/smolpart.ab > /tmp/mixq-smol/smollm2.gguf || exit
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl || exit
  PYTHONPATH=/tmp/site python3 scripts/e2e_gpu.py --ckpt /tmp/mixq-smol/smollm2.gguf 2>&1 \
    | tee "$OUT/e2e.txt" ;;
*) targets="kernels|tune|load|decode|quantize|full|bg TARGET...|wait|e2e-prep|e2e-part1|e2e"
   echo "usage: bash scripts/run_on_gpu.sh $targets"; exit 2 ;;
esac
