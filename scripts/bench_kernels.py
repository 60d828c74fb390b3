"""Time the packed low-bit GEMM of kernels.py against torch's fp16 matmul on a CUDA GPU.

    python scripts/bench_kernels.py                # the Llama-3-8B shape table, M = 1/16/64/256
    python scripts/bench_kernels.py --tune --M 1   # time every candidate tile config, per row
    python scripts/bench_kernels.py --M 16 256 --bits 4 --shapes 14336x4096 4096x14336

Each row prints the time of kernels.quant_matmul (config_for's tiles, or the fastest candidate
with --tune), cuBLAS fp16 on the same shape, and the GB/s of weight bytes moved against the
device's copy bandwidth. Both sides run inside CUDA graphs, cycling through 8 weight copies so
the working set does not fit in L2. docs/kernels.md explains the paths and keeps the tables.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402


def graph_time(fn, args_list, reps=3):
    """Seconds per call of fn: calls cycling through args_list captured in a CUDA graph (no
    Python or launch overhead), replayed after warm-up, timed with CUDA events, median of 7."""
    for a in args_list:
        fn(*a)  # compile and warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for a in args_list:
                fn(*a)
    graph.replay()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (reps * len(args_list)))
    return sorted(times)[len(times) // 2]


def random_weights(N, K, bits, groupsize, outlier_share, copies, dev):
    """`copies` random packed weights (so L2, 50 MB on an H100, cannot hold the working set)."""
    out = []
    for c in range(copies):
        g = torch.Generator(dev).manual_seed(c)
        t = kernels.pack_codes(torch.randint(0, 2 ** bits, (K, N), generator=g, device=dev), bits)
        t["scales"] = (torch.rand(K // groupsize, N, generator=g, device=dev) * 0.01).half()
        t["zeros"] = torch.full((K // groupsize, N), 2.0 ** (bits - 1), device=dev).half()
        if outlier_share:
            mask = torch.rand(N, K, generator=g, device=dev) < outlier_share
            t |= kernels.to_csr(torch.randn(N, K, generator=g, device=dev) * 0.01, mask)
            t["outlier_rows"] = kernels.outlier_rows(t)  # as QuantLinear keeps them
        out.append(t)
    return out


def tune_candidates(M, G):
    """The tile configs --tune times at M rows of x and groups of G (config_for's choices came
    from these)."""
    if M == 1:
        return [dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, ITERS=it, num_warps=w)
                for bn, bk, it, w in [(128, 32, 2, 2), (256, 32, 2, 4), (256, 64, 2, 4),
                                      (512, 64, 1, 8), (512, 64, 1, 4), (512, 32, 2, 4),
                                      (512, 64, 2, 4), (512, 128, 1, 4), (512, 32, 4, 4),
                                      (1024, 64, 1, 8), (1024, 32, 2, 8), (1024, 64, 1, 4),
                                      (1024, 32, 2, 4), (2048, 64, 1, 8), (2048, 64, 1, 4),
                                      (512, 64, 1, 2), (1024, 32, 4, 4), (1024, 64, 2, 4),
                                      (2048, 32, 2, 8)] if G % bk == 0] + \
            [dict(path="gemv", BLOCK_N=512, BLOCK_K=64, ITERS=1, num_warps=4,
                  fused_outliers=False)] + \
            [dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, ITERS=it, num_warps=4, sum_rows=True)
             for bn, bk, it in [(512, 64, 1), (1024, 32, 2)]]  # one atomic per row run
    if M <= 64:  # 128-wide tiles with 8 warps: with 4, the dequantized tile goes to shared
        # memory 2 bytes at a time (STS.U16 in scripts/compile_kernels.py; Triton's layout);
        # swap: the weight tile as tl.dot's first operand (fewest instructions per weight at
        # M = 16 in compile_kernels.py, on 64-row wgmma tiles)
        return [dict(path="gemm", BLOCK_M=max(16, min(M, 64)), BLOCK_N=bn, BLOCK_K=bk,
                     SPLIT_K=sk, num_warps=w, num_stages=st, swap=sw)
                for bn, bk, sk, w, st, sw in [
                    (64, 64, 4, 4, 3, False), (64, 128, 4, 4, 3, False),
                    (128, 64, 4, 8, 3, False), (64, 64, 8, 4, 3, False),
                    (128, 128, 2, 8, 3, False), (64, 64, 1, 4, 4, False),
                    (32, 64, 8, 4, 3, False), (32, 128, 4, 4, 3, False),
                    (64, 64, 8, 4, 3, True), (64, 128, 4, 4, 3, True), (64, 128, 8, 4, 3, True),
                    (128, 128, 4, 8, 3, True)]]
    return [dict(path="dequant", BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
            for bn, bk in [(64, 64), (128, 64), (128, 128)]] + \
        [dict(path="gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, num_warps=8,
              num_stages=st) for bm, bn, bk, st in [(128, 128, 64, 3), (64, 256, 64, 3),
                                                    (128, 256, 64, 3), (128, 128, 128, 4),
                                                    (256, 128, 64, 3)]]  # 256: W once


def bench(shapes, Ms, bit_widths, outlier_share=0.0035, groupsize=128, copies=8, tune=False):
    """Time quant_matmul against torch's fp16 matmul (cuBLAS) in the same run, both inside CUDA
    graphs, cycling through `copies` weight copies. GB/s counts the weight bytes moved (codes,
    statistics, outliers) and % compares it with the device's copy bandwidth. --tune times
    every candidate tile config and prints the fastest (for config_for)."""
    dev = "cuda"
    big = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)  # 1 GiB copy: read + write
    peak = 2 * big.numel() / graph_time(lambda: big.clone(), [()], reps=2) / 1e9
    big = None  # free the 1 GiB
    print(f"device copy bandwidth: {peak:.0f} GB/s (read + write of 1 GiB); "
          f"{torch.cuda.get_device_name()}, triton {kernels.triton.__version__}, "
          f"torch {torch.__version__}")
    print(f"groups of {groupsize}, fp16 activations, {copies} weight copies, CUDA-graph timing")
    print("| N x K | M | bits | outliers | us | fp16 us | speedup | GB/s | % of copy bw | "
          "config |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for N, K in shapes:
        xs = {M: torch.randn(M, K, device=dev, dtype=torch.float16) for M in Ms}
        ws = [torch.randn(N, K, device=dev, dtype=torch.float16) for _ in range(copies)]
        t16 = {M: graph_time(lambda w: xs[M] @ w.T, [(w,) for w in ws]) for M in Ms}
        del ws
        # what split-K costs the GEMM besides its kernel: y's zero-fill and the cast after it
        # (two launches; the GEMV does without them, see its epilogue)
        extra = {M: graph_time(lambda: torch.zeros(M, N, device=dev).to(torch.float16), [()])
                 for M in Ms if 1 < M <= 64}
        if extra:  # printed after the table
            notes.append(f"{N}x{K}: y's zero-fill + cast alone (split-K GEMM): " +
                         ", ".join(f"M={M} {sec * 1e6:.1f} us" for M, sec in extra.items()))
        for bits in bit_widths:
            for share in (0.0, outlier_share):
                ts = random_weights(N, K, bits, groupsize, share, copies, dev)
                scratch = kernels.new_workspace(N, dev)  # as a QuantLinear keeps one
                nbytes = sum(v.numel() * v.element_size() for v in ts[0].values())
                for M in Ms:
                    x = xs[M]
                    cands = tune_candidates(M, groupsize) if tune else \
                        [kernels.config_for(M, N, K, groupsize)]
                    best = None
                    for cfg in cands:
                        try:
                            sec = graph_time(
                                lambda t: kernels.quant_matmul(x, t, bits, groupsize, N, K, cfg,
                                                       scratch),
                                [(t,) for t in ts])
                        except Exception as e:  # a tile that does not compile: say so, go on
                            print(f"  config {cfg}: {type(e).__name__}: {str(e)[-400:]}")
                            continue
                        if tune:
                            print(f"  {N}x{K} M={M} {bits}-bit {share:.2%}: "
                                  f"{sec * 1e6:.1f} us {cfg}")
                        if best is None or sec < best[0]:
                            best = (sec, cfg)
                    if best is None:
                        continue
                    sec, cfg = best
                    ref = x.float() @ kernels.dequantize(ts[0], bits, groupsize, N, K).T
                    y = kernels.quant_matmul(x, ts[0], bits, groupsize, N, K, cfg, scratch)
                    err = (y.float() - ref).abs().max() / ref.abs().max()
                    assert err < 1e-2, f"wrong result: relative error {err:.2e}"
                    c = " ".join(f"{k}={v}" for k, v in cfg.items())
                    print(f"| {N}x{K} | {M} | {bits} | {share:.2%} | {sec * 1e6:.1f} | "
                          f"{t16[M] * 1e6:.1f} | {t16[M] / sec:.2f}x | {nbytes / sec / 1e9:.0f} | "
                          f"{100 * nbytes / sec / 1e9 / peak:.0f}% | {c} |", flush=True)
                del ts
    print("\n".join(notes))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Time kernels.quant_matmul against cuBLAS fp16 on "
                                "the Llama-3-8B shapes (a CUDA GPU; prints a markdown table).")
    p.add_argument("--tune", action="store_true", help="try candidate tile configs, print best")
    p.add_argument("--groupsize", type=int, default=128)
    p.add_argument("--M", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "1024x4096", "14336x4096",
                                                    "4096x14336"], help="N x K")
    a = p.parse_args()
    if any(b not in (2, 3, 4, 8) for b in a.bits) or any(m < 1 for m in a.M):
        raise SystemExit(f"error: --bits {a.bits} --M {a.M}: bits from 2, 3, 4, 8; M >= 1")
    try:
        shapes = [tuple(int(d) for d in s.split("x", 1)) for s in a.shapes]
    except ValueError:
        raise SystemExit(f"error: --shapes {' '.join(a.shapes)}: write each as NxK, e.g. "
                         "4096x14336") from None
    if any(K % 32 or K % a.groupsize for _, K in shapes):
        raise SystemExit(f"error: every K must be a multiple of 32 and of --groupsize "
                         f"{a.groupsize}")
    if not torch.cuda.is_available() or kernels.triton is None:
        raise SystemExit("error: the benchmark needs a CUDA GPU and triton")
    bench(shapes, a.M, a.bits, groupsize=a.groupsize, tune=a.tune)
