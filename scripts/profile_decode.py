"""Where a batch-1 decoding step of model.py (bf16, CUDA) spends GPU time: first the captured
step's time per token, then the same step run eagerly --steps times under torch.profiler,
kernels grouped by name (CUDA time summed over the steps).
    python scripts/profile_decode.py --ckpt checkpoints/random-llama3-8b"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as llama  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--ckpt", required=True)
p.add_argument("--steps", type=int, default=5)
a = p.parse_args()
m = llama.load(a.ckpt, dtype="bf16", device="cuda")[0]
with torch.no_grad():
    m.setup_cache(1, 128)
    step = m.static_decoder()  # captured graph; time it, then profile the eager step
    for i in range(3):
        step(1, i)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for i in range(20):
        step(1, 3 + i)
    ev[1].record()
    torch.cuda.synchronize()
    print(f"graph step: {ev[0].elapsed_time(ev[1]) / 20:.2f} ms")
    tok = torch.ones(1, 1, dtype=torch.long, device="cuda")
    pos = torch.tensor(30, device="cuda")
    for _ in range(2):
        m(tok, start_pos=pos, last_only=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            m(tok, start_pos=pos, last_only=True)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
