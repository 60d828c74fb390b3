"""kernels.py: the packed low-bit weight format of mixq and y = x @ dequant(Wq)^T in Triton.

This file imports torch and triton and nothing of ours, so it can be copied alone. It holds the
format (pack/unpack, dequantize), a plain torch path every device runs, the Triton kernels
(quant_matmul: dequantize-in-tile GEMM with split-K for small M, plus a CSR outlier kernel) and
QuantLinear, which model.py swaps in for a quantized nn.Linear. Tests run the kernels on the CPU
with TRITON_INTERPRET=1; `scripts/bench_kernels.py` times them on a GPU.

The format, one quantized nn.Linear of weight W (N out_features x K in_features), g = group size
(g = K for one group per output channel):

  qweight   int32 (K*b/32, N)  codes packed along K: word r of column n holds codes
                               k = r*(32/b) ... r*(32/b) + 32/b - 1, code k at bit shift
                               (k % (32/b)) * b, lowest k in the lowest bits
              b = 4:  word = [k7 k6 k5 k4 k3 k2 k1 k0]   (4 bits each, k0 = bits 0-3)
              b = 2:  word = [k15 ... k1 k0]             (2 bits each)
              b = 8:  word = [k3 k2 k1 k0]               (8 bits each)
              b = 3:  two planes, no value straddles a word:
                        qweight     the low 2 bits of every code, packed as b = 2
                        qweight_hi  the high bit of every code, packed as b = 1 (32 per word)
  scales    fp16 (K/g, N)      s of group k // g, output n
  zeros     fp16 (K/g, N)      integer zero points z (exact in fp16 up to 2048)
  outliers  CSR over output rows, additive corrections in 16 bits:
              outlier_rowptr int32 (N+1), outlier_cols int16 (nnz), outlier_vals fp16 (nnz)

  W[n, k] = s[k//g, n] * (q[k, n] - z[k//g, n]) + sum of outlier_vals at (n, k)

Weights kept in 16 bits (TaCQ, SpQR, outlier-aware QuantEase) are codes plus a correction: the
correction is the kept value minus the dequantized code, so the dense part needs no mask.
K must be a multiple of 32 (every Llama size is).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the torch path below needs only torch; the GPU path needs triton
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# -----------------------------------------------------------------------------
# Packing


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (K, N) integers in [0, 2^bits) -> int32 (K*bits/32, N), packed along K.
    bits in {1, 2, 4, 8}; 3-bit codes use pack3."""
    K, N = codes.shape
    per = 32 // bits  # codes per int32 word
    if 32 % bits or K % per:
        raise ValueError(f"cannot pack {bits}-bit codes along K={K}: need 32/bits | K")
    c = codes.to(torch.int64).reshape(K // per, per, N)  # (words, per, N)
    shifts = (torch.arange(per, dtype=torch.int64, device=codes.device) * bits).view(1, per, 1)
    word = (c << shifts).sum(dim=1)  # (K/per, N), each in [0, 2^32)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)  # same 32 bits


def unpack(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """int32 (K*bits/32, N) -> codes (K, N) uint8; the inverse of pack."""
    per = 32 // bits
    w = packed.to(torch.int64) & 0xFFFFFFFF  # undo the sign of int32
    shifts = (torch.arange(per, dtype=torch.int64, device=packed.device) * bits).view(1, per, 1)
    codes = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)  # (K/per, per, N)
    return codes.reshape(K, -1).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> dict:
    """codes (K, N) -> the tensors that store them: {"qweight"} or, for 3 bits, the two planes."""
    if bits == 3:
        return {"qweight": pack(codes & 3, 2), "qweight_hi": pack(codes >> 2, 1)}
    return {"qweight": pack(codes, bits)}


def unpack_codes(t: dict, bits: int, K: int) -> torch.Tensor:
    if bits == 3:
        return unpack(t["qweight"], 2, K) | (unpack(t["qweight_hi"], 1, K) << 2)
    return unpack(t["qweight"], bits, K)


def to_csr(delta: torch.Tensor, mask: torch.Tensor) -> dict:
    """The entries of delta (N, K) where mask is True, as CSR over rows (16-bit values)."""
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order
    counts = torch.bincount(rows, minlength=mask.shape[0])
    rowptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    rowptr[1:] = counts.cumsum(0)
    return {"outlier_rowptr": rowptr, "outlier_cols": cols.to(torch.int16),
            "outlier_vals": delta[rows, cols].to(torch.float16)}


def csr_to_dense(t: dict, N: int, K: int) -> torch.Tensor:
    """The (N, K) fp32 matrix of the CSR corrections (zeros elsewhere)."""
    rowptr = t["outlier_rowptr"].to(torch.int64)
    dev = rowptr.device
    rows = torch.repeat_interleave(torch.arange(N, device=dev), rowptr[1:] - rowptr[:-1])
    dense = torch.zeros(N, K, device=dev)
    dense[rows, t["outlier_cols"].to(torch.int64) & 0xFFFF] = t["outlier_vals"].float()
    return dense


def dequantize(t: dict, bits: int, groupsize: int, N: int, K: int) -> torch.Tensor:
    """W (N, K) fp32 from the stored tensors: s * (q - z) + outliers."""
    q = unpack_codes(t, bits, K).float()  # (K, N)
    g = K if groupsize in (-1, None) else groupsize
    s = t["scales"].float().repeat_interleave(g, dim=0)  # (K, N)
    z = t["zeros"].float().repeat_interleave(g, dim=0)
    w = (s * (q - z)).T  # (N, K)
    if "outlier_vals" in t and t["outlier_vals"].numel():
        w = w + csr_to_dense(t, N, K)
    return w


# -----------------------------------------------------------------------------
# Triton: y = x @ dequant(Wq)^T, then + the sparse outliers
#
# One kernel for every M: program (pid_m, pid_n, pid_k) owns a BLOCK_M x BLOCK_N tile of y and
# one of SPLIT_K slices of K. For each BLOCK_K rows of K it unpacks the codes of a
# (BLOCK_K, BLOCK_N) weight tile, dequantizes w = (q - z) * s with the tile's group statistics,
# and accumulates x_tile @ w in fp32 (tl.dot). With SPLIT_K > 1 the partial tiles are added with
# fp32 atomics into a zeroed fp32 output (split-K: many programs share a skinny GEMM's K).
# Activations in bf16 are converted at the load: no arithmetic is done in bf16.

if triton is not None:

    @triton.jit
    def _unpack_tile(qw_ptr, offs_k, offs_n, N, BITS: tl.constexpr, k_mask, n_mask):
        """Codes (BLOCK_K, BLOCK_N) of rows offs_k, columns offs_n from a plane packed along K."""
        PER: tl.constexpr = 32 // BITS  # codes per int32 word
        word = tl.load(qw_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :],
                       mask=k_mask[:, None] & n_mask[None, :], other=0)
        shift = ((offs_k % PER) * BITS)[:, None]
        return (word >> shift) & ((1 << BITS) - 1)  # mask after >>: int32 >> sign-extends

    @triton.jit
    def _quant_matmul_kernel(x_ptr, qw_ptr, qhi_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G,
                             BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            if BITS == 3:  # two planes: the low 2 bits and the high bit
                q = _unpack_tile(qw_ptr, offs_k, offs_n, N, 2, k_mask, n_mask) | \
                    (_unpack_tile(qhi_ptr, offs_k, offs_n, N, 1, k_mask, n_mask) << 2)
            else:
                q = _unpack_tile(qw_ptr, offs_k, offs_n, N, BITS, k_mask, n_mask)
            stat = (offs_k // G)[:, None] * N + offs_n[None, :]  # (BLOCK_K, BLOCK_N)
            kn_mask = k_mask[:, None] & n_mask[None, :]
            s = tl.load(s_ptr + stat, mask=kn_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + stat, mask=kn_mask, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) - z) * s  # (BLOCK_K, BLOCK_N), 0 outside K and N
            acc += tl.dot(x, w, input_precision="ieee")
        y = y_ptr + offs_m[:, None] * N + offs_n[None, :]
        mn_mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            tl.store(y, acc, mask=mn_mask)
        else:
            tl.atomic_add(y, acc, mask=mn_mask)

    @triton.jit
    def _outliers_kernel(x_ptr, rowptr_ptr, cols_ptr, vals_ptr, y_ptr, M, N, K,
                         BLOCK: tl.constexpr):
        """y[m, n] += sum over the CSR entries (n, k, v) of v * x[m, k]; one program per row n."""
        n = tl.program_id(0)
        start, end = tl.load(rowptr_ptr + n), tl.load(rowptr_ptr + n + 1)
        for m in range(M):
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for i0 in range(start, end, BLOCK):
                offs = i0 + tl.arange(0, BLOCK)
                mask = offs < end
                col = tl.load(cols_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
                v = tl.load(vals_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                acc += v * tl.load(x_ptr + m * K + col, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + m * N + n, tl.load(y_ptr + m * N + n) + tl.sum(acc))


def config_for(M: int, N: int, K: int) -> dict:
    """Tile sizes by M: a skinny GEMM (decode) splits K across programs; a wide one does not."""
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=max(1, min(8, K // 512)))
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1)


def quant_matmul(x: torch.Tensor, t: dict, bits: int, groupsize: int, N: int, K: int,
                 config: Optional[dict] = None) -> torch.Tensor:
    """y = x @ W^T for W in the packed format, with the Triton kernels; x (..., K) fp16, bf16 or
    fp32, y in x's dtype. On a CPU this runs under TRITON_INTERPRET=1 (tests)."""
    if triton is None:
        raise RuntimeError("the Triton path needs the triton package: pip install triton")
    shape = x.shape
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    cfg = config or config_for(M, N, K)
    g = K if groupsize in (-1, None) else groupsize
    # split-K programs add into zeros; a single program per tile stores into NaN, so any element
    # a kernel failed to write shows up
    fill = 0.0 if cfg["SPLIT_K"] > 1 else float("nan")
    y = torch.full((M, N), fill, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    qhi = t.get("qweight_hi", t["qweight"])
    _quant_matmul_kernel[grid](x2, t["qweight"], qhi, t["scales"], t["zeros"], y, M, N, K, g,
                               BITS=bits, **cfg)
    if "outlier_vals" in t and t["outlier_vals"].numel():
        _outliers_kernel[(N,)](x2, t["outlier_rowptr"], t["outlier_cols"], t["outlier_vals"], y,
                               M, N, K, BLOCK=64)
    return y.to(x.dtype).reshape(*shape[:-1], N)


# -----------------------------------------------------------------------------
# The module model.py swaps in for a quantized nn.Linear


class QuantLinear(nn.Module):
    """y = x @ W^T with W stored in the packed format above.

    On CUDA it runs the Triton kernels (quant_matmul); elsewhere the weight is dequantized on
    every call and multiplied with F.linear: the same numbers up to summation order, not fast."""

    def __init__(self, in_features, out_features, bits, groupsize, tensors: dict):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.groupsize = bits, groupsize
        for name, value in tensors.items():
            self.register_buffer(name, value)

    def stored(self) -> dict:
        return dict(self.named_buffers())

    def dequantized_weight(self) -> torch.Tensor:
        """W (N, K) in fp32."""
        return dequantize(self.stored(), self.bits, self.groupsize, self.out_features,
                          self.in_features)

    def forward(self, x):
        if x.is_cuda and triton is not None and not os.environ.get("MIXQ_TORCH_PATH"):
            return quant_matmul(x, self.stored(), self.bits, self.groupsize, self.out_features,
                                self.in_features)
        return F.linear(x, self.dequantized_weight().to(x.dtype))

    def extra_repr(self):
        g = "per-channel" if self.groupsize in (-1, None) else f"g{self.groupsize}"
        nnz = self.outlier_vals.numel() if hasattr(self, "outlier_vals") else 0
        return (f"in={self.in_features}, out={self.out_features}, {self.bits}-bit {g}, "
                f"{nnz} outliers")


# -----------------------------------------------------------------------------
# Benchmark: python kernels.py --bench   (a CUDA GPU; prints a markdown table)


def _bench(shapes, Ms, bit_widths, outlier_share=0.0035, groupsize=128, copies=8):
    """Time quant_matmul against torch's fp16 matmul (cuBLAS) in the same run: CUDA events after
    warm-up, median of 50 calls, cycling through `copies` weight copies so L2 does not flatter
    the numbers. GB/s counts the weight bytes moved (codes, statistics, outliers)."""
    dev = "cuda"

    def timed(fn, args_list):
        for a in args_list[:2]:
            fn(*a)
        torch.cuda.synchronize()
        times = []
        for i in range(50):
            a = args_list[i % len(args_list)]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*a)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    big = torch.empty(2 ** 28, dtype=torch.uint8, device=dev)  # 256 MiB device copy bandwidth
    copy_s = timed(lambda: big.clone(), [()])
    peak = 2 * big.numel() / copy_s / 1e9
    print(f"device copy bandwidth: {peak:.0f} GB/s (read + write of 256 MiB)")
    print("| N x K | M | bits | outliers | us | fp16 us | speedup | GB/s | % of copy bw |")
    print("|---|---|---|---|---|---|---|---|---|")
    for N, K in shapes:
        for M in Ms:
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            ws = [torch.randn(N, K, device=dev, dtype=torch.float16) for _ in range(copies)]
            t16 = timed(lambda w: x @ w.T, [(w,) for w in ws])
            for bits in bit_widths:
                for share in (0.0, outlier_share):
                    ts = []
                    for c in range(copies):
                        g = torch.Generator().manual_seed(c)
                        t = pack_codes(torch.randint(0, 2 ** bits, (K, N), generator=g), bits)
                        t["scales"] = torch.rand(K // groupsize, N, generator=g).half() * 0.01
                        t["zeros"] = torch.full((K // groupsize, N), 2.0 ** (bits - 1)).half()
                        if share:
                            mask = torch.rand(N, K, generator=g) < share
                            t |= to_csr(torch.randn(N, K, generator=g) * 0.01, mask)
                        ts.append({k: v.to(dev) for k, v in t.items()})
                    sec = timed(lambda t: quant_matmul(x, t, bits, groupsize, N, K),
                                [(t,) for t in ts])
                    nbytes = sum(v.numel() * v.element_size() for v in ts[0].values())
                    print(f"| {N}x{K} | {M} | {bits} | {share:.2%} | {sec * 1e6:.1f} | "
                          f"{t16 * 1e6:.1f} | {t16 / sec:.2f}x | {nbytes / sec / 1e9:.0f} | "
                          f"{100 * nbytes / sec / 1e9 / peak:.0f}% |", flush=True)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Benchmark the packed low-bit GEMM on a CUDA GPU.")
    p.add_argument("--bench", action="store_true", help="run the Llama-3-8B shape table")
    p.add_argument("--groupsize", type=int, default=128)
    a = p.parse_args()
    if a.bench:
        if not torch.cuda.is_available() or triton is None:
            raise SystemExit("error: --bench needs a CUDA GPU and triton")
        _bench([(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)], [1, 16, 64, 256],
               [4, 3, 2], groupsize=a.groupsize)
