"""How many operations GPTQ and QuantEase issue per weight column, with the column loops in torch
(mixq.gptq_block, mixq.cd_block) and through the Triton block kernels (kernels.gptq_block,
kernels.cd_block; run here on the CPU interpreter). Counted: top-level torch operations (views
included: each costs host time, most launch a GPU kernel) and block-kernel launches. On a GPU
the per-column operations of the torch loops, not their arithmetic, set their time.

    python scripts/solver_launches.py [--m 256] [--n 512]
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on CPU tensors
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import kernels  # noqa: E402
import mixq  # noqa: E402


def count(job, gptq_loop, cd_loop) -> tuple:
    """(top-level torch operations, column-loop calls) while job(gptq_loop, cd_loop) runs."""
    calls = {"n": 0}

    def counting(f):
        def g(*args, **kw):
            calls["n"] += 1
            return f(*args, **kw)
        return g
    with profile(activities=[ProfilerActivity.CPU]) as p:
        job(counting(gptq_loop), counting(cd_loop))
    top = [e for e in p.events() if e.cpu_parent is None]
    return len(top), calls["n"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--n", type=int, default=512)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    W = torch.randn(a.m, a.n, generator=g)
    X = torch.randn(a.n, 2 * a.n, generator=g)
    sigma = X @ X.T / (2 * a.n)
    cfg = mixq.QuantConfig(wbits=4, groupsize=128, iters=1)
    jobs = {"GPTQ (W4 g128)": lambda gb, cb: mixq.gptq(W, 2 * sigma, cfg, block=gb),
            "QuantEase, one sweep (W4 g128)": lambda gb, cb: mixq.quantease(W, sigma, cfg,
                                                                           block=cb)}
    print(f"W {a.m} x {a.n}: top-level torch operations and block-kernel launches\n")
    print("| solver | torch loop: ops | per column | block kernels: ops + launches | per column |")
    print("|---|---|---|---|---|")
    for name, job in jobs.items():
        torch_ops, _ = count(job, mixq.gptq_block, mixq.cd_block)
        ops, launches = count(job, kernels.gptq_block, kernels.cd_block)
        print(f"| {name} | {torch_ops:,} | {torch_ops / a.n:.1f} | {ops:,} + {launches} | "
              f"{(ops + launches) / a.n:.2f} |")


if __name__ == "__main__":
    main()
