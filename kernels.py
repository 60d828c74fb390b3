"""kernels.py: the packed low-bit weight format of mixq and y = x @ dequant(Wq)^T in Triton.

This file imports torch and triton and nothing of ours, so it can be copied alone. In order:
the format (pack/unpack, dequantize: the torch reference every device runs); one simple Triton
kernel, simple_quant_matmul, to read first; the fast paths (quant_matmul: a GEMV for decode, a
dequantize-in-tile GEMM for small batches, dequantize + cuBLAS for prefill, and CSR outlier
kernels); QuantLinear, which model.py swaps in for a quantized nn.Linear; ResQ's integer
product (int8 activation codes times packed weight codes, exact in int32) and ResQLinear; and
the column loops of GPTQ and QuantEase that mixq.py runs on a GPU (one launch per block).
Tests run the kernels on the CPU with TRITON_INTERPRET=1; scripts/bench_kernels.py times them
on a GPU.

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
                        qweight_hi  the high bit of every code, 32 per word: word r holds
                                    those of codes 32r .. 32r+31 (qweight's words 2r, 2r+1),
                                    nibble j those of codes 2j+16, 2j+17, 2j, 2j+1 (lowest
                                    bit first; HI_ORDER), so that one bitwise select puts each
                                    right above its code's low bits (_three_bit_fields):
                lo = word 2r, hi = word r:
                  (lo & 0x33333333) | (hi & 0xCCCCCCCC)                 nibble j: code 2j
                  ((lo >> 2) & 0x33333333) | ((hi >> 1) & 0xCCCCCCCC)   nibble j: code 2j+1
                lo = word 2r+1: the same with hi << 2 for hi            codes 2j+16, 2j+17
                  (3-bit codes in bits 0-2 of each nibble; bit 3 belongs to another code)
  scales    fp16 (G, N)        s of group k // g, output n; G = ceil(K/g) (a partial last
                               group where g does not divide K, as GPTQModel stores it)
  zeros     fp16 (G, N)        integer zero points z, |z| <= 1024 (mixq's lie in [0, 2^b))
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


FORMAT = "kernels.py packed v2"  # what a checkpoint's quantization_config["format"] names
RESQ_FORMAT = "kernels.py resq v1"  # the same for ResQ's linears (ResQLinear)
# (v1 packed the 3-bit high plane as b = 1 in code order)

# 3 bits: bit b of a high-plane word holds the high bit of code HI_ORDER[b] of its 32 codes
HI_ORDER = [16 * (1 - b % 4 // 2) + 2 * (b // 4) + b % 2 for b in range(32)]


def pack_codes(codes: torch.Tensor, bits: int) -> dict:
    """codes (K, N) -> the tensors that store them: {"qweight"} or, for 3 bits, the two planes."""
    if bits == 3:
        K, N = codes.shape
        hi = (codes >> 2).reshape(K // 32, 32, N)[:, HI_ORDER]  # bit b <- code HI_ORDER[b]
        return {"qweight": pack(codes & 3, 2), "qweight_hi": pack(hi.reshape(K, N), 1)}
    return {"qweight": pack(codes, bits)}


def unpack_codes(t: dict, bits: int, K: int) -> torch.Tensor:
    """The codes (K, N) uint8 of the stored tensors; the inverse of pack_codes."""
    if bits == 3:
        bit = unpack(t["qweight_hi"], 1, K)
        hi = torch.empty_like(bit).reshape(K // 32, 32, -1)
        hi[:, HI_ORDER] = bit.reshape(K // 32, 32, -1)  # code HI_ORDER[b] <- bit b
        return unpack(t["qweight"], 2, K) | (hi.reshape(K, -1) << 2)
    return unpack(t["qweight"], bits, K)


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (K, N) in [0, 2^bits) -> int32 (K*bits/32, N): each column one little-endian bit
    stream, code k in bits k*bits .. k*bits + bits-1, so a 3-bit code may straddle two words.
    This is the packing of other tools' formats (GPTQ's qweight and qzeros, compressed-tensors'
    weight_packed); for 2, 4 and 8 bits it is `pack`, and mixq's own qweight, word for word."""
    if 32 % bits == 0:
        return pack(codes, bits)
    K, N = codes.shape
    if K % 32:
        raise ValueError(f"cannot pack {bits}-bit codes along K={K}: need 32 | K")
    c = codes.to(torch.int64).reshape(K // 32, 32, N)  # 32 codes fill `bits` whole words
    words = torch.zeros(K // 32, bits, N, dtype=torch.int64, device=codes.device)
    for j in range(32):
        w, shift = divmod(j * bits, 32)  # code j starts at bit `shift` of word w
        words[:, w] |= (c[:, j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # its high bits open the next word
            words[:, w + 1] |= c[:, j] >> (32 - shift)
    words = words.reshape(K * bits // 32, N)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_dense(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """int32 (K*bits/32, N) -> codes (K, N) uint8; the inverse of pack_dense."""
    if 32 % bits == 0:
        return unpack(packed, bits, K)
    w = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(K // 32, bits, -1)
    codes = torch.zeros(K // 32, 32, w.shape[-1], dtype=torch.int64, device=packed.device)
    for j in range(32):
        i, shift = divmod(j * bits, 32)
        codes[:, j] = w[:, i] >> shift
        if shift + bits > 32:
            codes[:, j] |= w[:, i + 1] << (32 - shift)
    return (codes & ((1 << bits) - 1)).reshape(K, -1).to(torch.uint8)


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
    s = t["scales"].float().repeat_interleave(g, dim=0)[:K]  # (K, N)
    z = t["zeros"].float().repeat_interleave(g, dim=0)[:K]
    w = (s * (q - z)).T  # (N, K)
    if "outlier_vals" in t and t["outlier_vals"].numel():
        w = w + csr_to_dense(t, N, K)
    return w


# -----------------------------------------------------------------------------
# The simple kernel: y = x @ dequant(Wq)^T, one output tile per program
#
# Read this one first. Each program owns a (BLOCK_M, BLOCK_N) tile of y and walks K in steps of
# BLOCK_K: it loads the int32 words that hold the codes of a (BLOCK_K, BLOCK_N) weight tile (a
# word once per code it holds, the repeats from cache), shifts each code down and masks it, makes
# w = s (q - z) with the statistics of each code's group, and accumulates x_tile @ w_tile in fp32.
# The fast paths below compute the same numbers; each section says what it adds.

if triton is not None:

    @triton.jit
    def _simple_matmul_kernel(x_ptr, qw_ptr, qhi_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G,
                              BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
        """y (M, N) fp32 = x (M, K) @ W^T, W[n, k] = s[k // G, n] * (q[k, n] - z[k // G, n]),
        for the packed codes of the format above (BITS in {2, 3, 4, 8}); no outliers."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            kn_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
            col = offs_n[None, :]
            if BITS == 3:  # low 2 bits: the 2-bit plane; high bit: bit HI_ORDER^-1(k % 32)
                lo = tl.load(qw_ptr + (offs_k // 16)[:, None] * N + col, mask=kn_mask, other=0)
                lo = (lo >> ((offs_k % 16) * 2)[:, None]) & 3
                i = offs_k % 32
                bit = 4 * (i % 16 // 2) + 2 * (1 - i // 16) + i % 2  # HI_ORDER[bit] == i
                hi = tl.load(qhi_ptr + (offs_k // 32)[:, None] * N + col, mask=kn_mask, other=0)
                q = lo | (((hi >> bit[:, None]) & 1) << 2)
            else:  # code k of column n: word k // PER, bits (k % PER) * BITS and up
                PER: tl.constexpr = 32 // BITS
                word = tl.load(qw_ptr + (offs_k // PER)[:, None] * N + col, mask=kn_mask,
                               other=0)
                q = (word >> ((offs_k % PER) * BITS)[:, None]) & ((1 << BITS) - 1)
            stat = (offs_k // G)[:, None] * N + col  # the group of each row k
            s = tl.load(s_ptr + stat, mask=kn_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + stat, mask=kn_mask, other=0.0).to(tl.float32)
            w = s * (q.to(tl.float32) - z)  # (BLOCK_K, BLOCK_N)
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")  # exact fp32 products
        tl.store(y_ptr + offs_m[:, None] * N + col, acc,
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def simple_quant_matmul(x: torch.Tensor, t: dict, bits: int, groupsize: int, N: int,
                        K: int) -> torch.Tensor:
    """y = x @ W^T (..., N) in x's dtype for x (..., K) and W (N, K) in the packed format t: the
    dense part with _simple_matmul_kernel, the outliers added in torch (x @ their dense matrix).
    The readable reference of quant_matmul: the same numbers up to summation order."""
    if triton is None:
        raise RuntimeError("the Triton path needs the triton package: pip install triton")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    g = K if groupsize in (-1, None) else groupsize
    y = torch.empty(M, N, device=x.device, dtype=torch.float32)
    BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32  # tl.dot takes tiles of at least 16
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _simple_matmul_kernel[grid](x2, *_packed_args(t), y, M, N, K, g, BITS=bits,
                                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    if "outlier_vals" in t and t["outlier_vals"].numel():
        y += x2.float() @ csr_to_dense(t, N, K).T
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def _packed_args(t: dict) -> tuple:
    """What every kernel reads of a packed weight: the codes (both planes at 3 bits; otherwise
    qweight again in the high plane's place, never read unless BITS == 3), scales, zeros."""
    return t["qweight"], t.get("qweight_hi", t["qweight"]), t["scales"], t["zeros"]


# -----------------------------------------------------------------------------
# Fast paths: the same y = x @ dequant(Wq)^T (+ the sparse outliers), three paths chosen by M
# (rows of x) in quant_matmul, each adding to the simple kernel what its sizes need:
#
#   M = 1       _gemv_kernel (decode). Adds split-K: program (pid_n, pid_k) owns BLOCK_N
#               outputs and ITERS * BLOCK_K rows of K, so many programs stream one matrix; they
#               add partial sums into an fp32 workspace with relaxed atomics and the last
#               program of each column block writes y and clears the workspace (one launch in
#               all). No tensor cores: when a K-tile lies inside one group the statistics factor
#               out of the sum,  sum_k x_k s (q_kn - z) = s (sum_k x_k q_kn - z sum_k x_k),  and
#               the codes are multiplied as denormal floats (_fields_dot), one AND + one FMA each.
#   2..64       _gemm_kernel (small batches). The simple kernel's tile loop plus: optional
#               split-K (programs add into a zeroed fp32 y with atomics, cast after the launch),
#               fp16/bf16 tensor cores, every word read once and split into its codes with the
#               fp16 magic number (_fields: 1024 + q, two codes per instruction), and config
#               swap=True, which computes y^T = W x^T (the weight tile as the first operand).
#   > 64        _dequant_kernel (prefill): writes W^T (K, N) in x's dtype once with the same
#               tile code, then cuBLAS (torch.matmul): at compute-bound sizes a dequantize-in-tile
#               GEMM loses to cuBLAS.
#   outliers    M = 1: inside the GEMV (_outlier_adds: each split-K program adds an even share
#               of its column block's entries into the workspace, relaxed atomics). 2..64:
#               _outliers_kernel after the GEMM, a program per 16 rows r of W walks their CSR
#               entries, y[m, r] += v * x[m, c] (no atomics: it owns those columns of y); it also
#               serves M = 1 with config fused_outliers=False, for comparison. > 64: added into
#               W^T before cuBLAS (_add_outliers_kernel).
#
# Codes are read as words, every word once (but the GEMM's 3-bit high plane: each word once per
# low-plane word, the second time from cache): the GEMM and the prefill dequantization split a
# (BLOCK_K*b/32, BLOCK_N) tile of int32 into its codes by halving the fields of both 16-bit
# halves of each word at once, as fp16 1024 + q (_fields); the GEMV masks each code in place
# (see _fields_dot); 3-bit codes first become 3-bit fields of nibbles (_three_bit_fields).
# Neither turns codes into floats with an int-to-float instruction: bit tricks do it with an AND
# or an OR (_fields_dot, _fields). Activations in bf16 are converted at the load; the GEMV's
# arithmetic is fp32, the GEMM's weights are fp16 arithmetic for fp16 x and fp32 otherwise, each
# weight rounded once (fp16/bf16 only as tl.dot inputs).
# perf: int-to-float conversion (I2F) runs at a quarter rate on Hopper, enough to bound the GEMV
# whatever the bit width; the bit tricks avoid it.

if triton is not None:

    @triton.jit
    def _load_words(qw_ptr, rows, n_rows, offs_n, N, n_mask):
        """The (len(rows), BLOCK_N) int32 words of one plane, 0 outside it."""
        return tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :],
                       mask=(rows < n_rows)[:, None] & n_mask[None, :], other=0)

    @triton.jit
    def _three_bit_fields(lo, hi, w):
        """3 bits: word 2r + w of the low plane (lo) and word r of the high one (hi) -> two
        words of 3-bit codes in nibbles (bits 0-2 of nibble j; bit 3 is another code's), codes
        2j and 2j+1 of lo's 16. One bitwise select each, (a & 0x33333333) | (b & 0xCCCCCCCC),
        a LOP3 instruction: the high plane is stored in that order (the format at the top)."""
        low = tl.full((), 0x33333333, lo.dtype)  # bits 0 and 1 of every nibble
        h = hi << 2 * w  # word 2r+1's high bits sit 2 lower in hi
        even = (lo & low) | (h & ~low)  # code 2j in nibble j
        odd = ((lo >> 2) & low) | ((h >> 1) & ~low)  # code 2j+1 in nibble j
        return even, odd

    @triton.jit
    def _fields(t, FB: tl.constexpr, CB: tl.constexpr):
        """The codes q (CB bits) in the 32/FB fields of FB bits of the int32 words t, as the
        fp16 numbers 1024 + q, (R, BLOCK_N) -> (R, BLOCK_N, 32/FB), field i at [.., i]:
          fp16 with exponent 2^10 and q in its mantissa is 1024 + q (the magic number of fp16),
          so t & (m << 16 | m) | 0x64006400 holds two codes' 1024 + q, one per 16-bit lane:
          fields i and i + 16/FB.
        Fields of 16 bits are halved down to FB bits in both lanes at once, one AND or shift
        for two codes (tl.join: the new axis is last and stays in the same thread)."""
        # perf: a thread keeping all the codes of its words lets the tile go to shared memory
        # for tl.dot in 16-byte stores, not one 2-byte store per weight
        for level in tl.static_range(1, 5):
            if (16 >> level) >= FB:  # in both lanes, fields of 2h bits -> h bits
                t = tl.join(t & (((1 << (16 >> level)) - 1) * 0x10001),
                            (t >> (16 >> level)) & (((1 << (16 >> level)) - 1) * 0x10001))
        t = (t & (((1 << CB) - 1) * 0x10001)) | 0x64006400  # lanes: 1024 + q as fp16 bits
        lo = t.to(tl.int16).to(tl.float16, bitcast=True)  # fields 0 .. 16/FB - 1
        hi = (t >> 16).to(tl.int16).to(tl.float16, bitcast=True)  # the 16/FB after them
        q = tl.reshape(tl.join(lo, hi), (t.shape[0], t.shape[1], 16 // FB, 2))
        q = tl.permute(q, (0, 1, 3, 2))  # [.., lane, field in lane]
        return tl.reshape(q, (t.shape[0], t.shape[1], 32 // FB))

    @triton.jit
    def _codes(qw_ptr, qhi_ptr, k0, offs_n, N, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
               n_mask):
        """1024 + q in fp16 (BLOCK_K, BLOCK_N) for the codes q of rows k0 .. k0+BLOCK_K-1."""
        BLOCK_N: tl.constexpr = offs_n.shape[0]
        if BITS == 3:  # two planes: the low 2 bits (16 per word), the high bit (32 per word)
            PER: tl.constexpr = 16
            rows = k0 // PER + tl.arange(0, BLOCK_K // PER)
            lo = _load_words(qw_ptr, rows, K // PER, offs_n, N, n_mask)
            # the high bits of words 2r and 2r+1's codes: word r of the 1-bit plane
            hi = _load_words(qhi_ptr, rows // 2, K // 32, offs_n, N, n_mask)
            even, odd = _three_bit_fields(lo, hi, (rows % 2)[:, None])
            q = tl.join(_fields(even, 4, 3), _fields(odd, 4, 3))  # [.., j, e]: code 2j+e
        else:  # (an if/else, not an early return: the compiler would still build the rest)
            PER: tl.constexpr = 32 // BITS  # codes per int32 word
            rows = k0 // PER + tl.arange(0, BLOCK_K // PER)
            q = _fields(_load_words(qw_ptr, rows, K // PER, offs_n, N, n_mask), BITS, BITS)
        q = tl.reshape(q, (BLOCK_K // PER, BLOCK_N, PER))  # code i of word r at [r, n, i]
        q = tl.permute(q, (0, 2, 1))  # (R, PER, BLOCK_N)
        return tl.reshape(q, (BLOCK_K, BLOCK_N))  # row k0 + r*PER + i = code i of word r

    @triton.jit
    def _weights(qw_ptr, qhi_ptr, s_ptr, z_ptr, k0, offs_n, N, K, G: tl.constexpr,
                 BITS: tl.constexpr, BLOCK_K: tl.constexpr, ROW_STATS: tl.constexpr, n_mask,
                 OUT: tl.constexpr):
        """w = s (q - z), (BLOCK_K, BLOCK_N) in OUT (fp16 or fp32), each weight the exact
        value rounded once; 0 outside K and N."""
        q = _codes(qw_ptr, qhi_ptr, k0, offs_n, N, K, BITS, BLOCK_K, n_mask)
        if ROW_STATS:  # the tile lies in one group: one row of statistics
            stat = (k0 // G) * N + offs_n[None, :]
            kn_mask = n_mask[None, :] & (k0 + 0 * offs_n[None, :] < K)  # a tensor, not a bool
        else:  # groups smaller than the tile: statistics per element
            offs_k = k0 + tl.arange(0, BLOCK_K)
            stat = (offs_k // G)[:, None] * N + offs_n[None, :]
            kn_mask = (offs_k < K)[:, None] & n_mask[None, :]
        s = tl.load(s_ptr + stat, mask=kn_mask, other=0.0)
        z = tl.load(z_ptr + stat, mask=kn_mask, other=0.0)
        d = q - (z + 1024.0)  # (1024 + q) - (1024 + z) = q - z, exact in fp16 (|z| <= 1024)
        if OUT == tl.float16:
            w = d * s  # fp16, two weights per instruction; rounded once
        else:
            w = d.to(tl.float32) * s.to(tl.float32)  # exact: 12 bits times 11
        return w

    @triton.jit
    def _x_times_code(x, w, p: tl.constexpr, CB: tl.constexpr):
        """x q 2^-60 for the CB-bit code q at bit p of the uint32 w (see _fields_dot)."""
        q = (w & (tl.full((), (1 << CB) - 1, tl.uint32) << p)).to(tl.float32, bitcast=True)
        return (x * 2.0 ** (89 - p)) * q  # x 2^(89-p) * q 2^(p-149)

    @triton.jit
    def _load_row(qw_ptr, row, n_rows, offs_n, N, n_mask, EVEN: tl.constexpr):
        """Row `row` of a plane, (BLOCK_N,) uint32 words (0 outside it)."""
        if EVEN:  # K and N are multiples of the tiles: no masks
            word = tl.load(qw_ptr + row * N + offs_n)
        else:
            word = tl.load(qw_ptr + row * N + offs_n,
                           mask=n_mask & (row + 0 * offs_n < n_rows), other=0)
        return word.to(tl.uint32, bitcast=True)

    @triton.jit
    def _fields_dot(acc, xsum, word, x_ptr, k, STEP: tl.constexpr, K, FB: tl.constexpr,
                    CB: tl.constexpr, EVEN: tl.constexpr):
        """acc + 2^-60 sum_i x_(k + i STEP) q_i and xsum + sum_i x_(k + i STEP), for the codes
        q_i (CB bits) in the 32/FB fields of FB bits of word: field i at bit i FB. Per weight
        one AND and one FMA, with no int-to-float conversion:
          code i masked in place at bit p (word & (m << p)) and read as an fp32 has a zero
          exponent field: it is the denormal q 2^(p-149) (GPUs add and multiply denormals at
          full speed); times x_k 2^(89-p) (exact: a power of two) it adds x_k q 2^-60 to the
          sum. (|x| < 2^38, fp16 always; sums below 2^-66 lose precision.)
        Codes that reach bit 23 (the exponent field) are read from the word shifted down."""
        FIT: tl.constexpr = (23 - CB) // FB + 1  # fields i < FIT lie inside the mantissa
        high = word >> (FIT * FB)  # fields FIT .. from bit 0 (uint32: a logical shift)
        for i in tl.static_range(32 // FB):
            if EVEN:
                x = tl.load(x_ptr + k + i * STEP).to(tl.float32)
            else:
                x = tl.load(x_ptr + k + i * STEP, mask=k + i * STEP < K, other=0.0).to(
                    tl.float32)
            xsum += x
            if i < FIT:
                acc += _x_times_code(x, word, i * FB, CB)
            else:
                acc += _x_times_code(x, high, (i - FIT) * FB, CB)
        return acc, xsum

    @triton.jit
    def _codes_dot(x_ptr, qw_ptr, qhi_ptr, k0, offs_n, N, K, BITS: tl.constexpr,
                   BLOCK_K: tl.constexpr, n_mask, EVEN: tl.constexpr):
        """2^-60 sum_k x_k q_kn over rows k0 .. k0+BLOCK_K-1 -> (BLOCK_N,) fp32, and sum_k x_k
        (a scalar). Everything stays in the layout the words were loaded in."""
        # perf: a 2-D (codes, BLOCK_N) form made the compiler shuffle every word through
        # shared memory, with barriers
        acc = tl.zeros(offs_n.shape, dtype=tl.float32)
        xsum = 0.0
        if BITS == 3:  # per 32 codes: words 2r, 2r+1 of the low plane, word r of the high one
            for r in tl.static_range(BLOCK_K // 32):
                row = k0 // 32 + r
                hi = _load_row(qhi_ptr, row, K // 32, offs_n, N, n_mask, EVEN)
                for w in tl.static_range(2):  # codes 32 row + 16 w + 2j (+1), nibble j
                    lo = _load_row(qw_ptr, 2 * row + w, K // 16, offs_n, N, n_mask, EVEN)
                    even, odd = _three_bit_fields(lo, hi, w)
                    k = 32 * row + 16 * w
                    acc, xsum = _fields_dot(acc, xsum, even, x_ptr, k, 2, K, 4, 3, EVEN)
                    acc, xsum = _fields_dot(acc, xsum, odd, x_ptr, k + 1, 2, K, 4, 3, EVEN)
        else:
            PER: tl.constexpr = 32 // BITS  # codes per int32 word
            for r in tl.static_range(BLOCK_K // PER):
                row = k0 // PER + r
                word = _load_row(qw_ptr, row, K // PER, offs_n, N, n_mask, EVEN)
                acc, xsum = _fields_dot(acc, xsum, word, x_ptr, row * PER, 1, K, BITS, BITS,
                                        EVEN)
        return acc, xsum

    @triton.jit
    def _run_sum(v1, start1, v2, start2):
        """Combine for a segmented sum: (sum so far, run starts here) pairs, where a run start
        on the right cuts off what comes from the left."""
        return tl.where(start2, v2, v1 + v2), start1 | start2

    @triton.jit
    def _outlier_adds(x_ptr, rowptr_ptr, rows_ptr, cols_ptr, vals_ptr, ws_ptr, N,
                      BLOCK_N: tl.constexpr, BLOCK: tl.constexpr, SUM_ROWS: tl.constexpr):
        """The 16-bit outliers inside the GEMV: the CSR entries of this column block's rows are
        dealt out evenly to its split-K programs (no program becomes the tail, however skewed
        the rows), each adding v * x[c] for its entries into the workspace row r they belong
        to (relaxed atomics, like the partial sums; r from outlier_rows, the CSR row of each
        entry, so no search). A program's entries are a contiguous stretch of CSR, sorted by
        row, so with many outliers per row most of its atomic adds hit the same few addresses;
        SUM_ROWS first sums each run of one row (a segmented scan) and adds once per run."""
        pid_n, pid_k, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        start = tl.load(rowptr_ptr + pid_n * BLOCK_N)
        end = tl.load(rowptr_ptr + tl.minimum((pid_n + 1) * BLOCK_N, N))
        chunk = tl.cdiv(end - start, splits)
        first, last = start + pid_k * chunk, tl.minimum(start + (pid_k + 1) * chunk, end)
        for i0 in range(first, last, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            mask = i < last
            r = tl.load(rows_ptr + i, mask=mask, other=0)
            c = tl.load(cols_ptr + i, mask=mask, other=0).to(tl.int32) & 0xFFFF  # int16 stored
            v = tl.load(vals_ptr + i, mask=mask, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
            add = v * xv
            if SUM_ROWS:  # rows r >= 0, so -1 marks "no neighbour in this chunk"
                prev = tl.load(rows_ptr + i - 1, mask=mask & (i > i0), other=-1)
                nxt = tl.load(rows_ptr + i + 1, mask=(i + 1 < last) & (i + 1 < i0 + BLOCK),
                              other=-1)
                add, _ = tl.associative_scan((add, r != prev), 0, _run_sum)  # run sums so far
                mask &= r != nxt  # the last entry of each run adds the run's sum
            tl.atomic_add(ws_ptr + r, add, mask=mask, sem="relaxed")

    @triton.jit
    def _gemv_kernel(x_ptr, qw_ptr, qhi_ptr, s_ptr, z_ptr, rowptr_ptr, rows_ptr, cols_ptr,
                     vals_ptr, ws_ptr, count_ptr, y_ptr, N, K, G: tl.constexpr,
                     BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     ITERS: tl.constexpr, ROW_STATS: tl.constexpr, EVEN: tl.constexpr,
                     OUTLIERS: tl.constexpr, OUT_BLOCK: tl.constexpr, SUM_ROWS: tl.constexpr):
        """y (N,) = x (K,) @ W^T (+ outliers) for one row of x (decode), in one launch. Over the
        simple kernel: split-K with an fp32 workspace, statistics factored out of the sum when a
        K-tile lies in one group, codes multiplied as denormals (_fields_dot), no tensor cores,
        the outliers fused (_outlier_adds)."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for it in tl.static_range(ITERS):  # unrolled: the loads of all tiles go out together
            k0 = (pid_k * ITERS + it) * BLOCK_K
            if ROW_STATS:  # y_n += s_n * (sum_k x_k q_kn - z_n * sum_k x_k), xq = 2^-60 sum
                xq, xsum = _codes_dot(x_ptr, qw_ptr, qhi_ptr, k0, offs_n, N, K, BITS, BLOCK_K,
                                      n_mask, EVEN)
                stat_mask = n_mask & (k0 + 0 * offs_n < K)  # a tensor, not a Python bool
                s = tl.load(s_ptr + (k0 // G) * N + offs_n, mask=stat_mask, other=0.0)
                z = tl.load(z_ptr + (k0 // G) * N + offs_n, mask=stat_mask, other=0.0)
                acc += s.to(tl.float32) * (xq * 2.0 ** 60 - z.to(tl.float32) * xsum)
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                w = _weights(qw_ptr, qhi_ptr, s_ptr, z_ptr, k0, offs_n, N, K, G, BITS,
                             BLOCK_K, False, n_mask, tl.float32)
                acc += tl.sum(x[:, None] * w, axis=0)
        if OUTLIERS:
            _outlier_adds(x_ptr, rowptr_ptr, rows_ptr, cols_ptr, vals_ptr, ws_ptr, N, BLOCK_N,
                          OUT_BLOCK, SUM_ROWS)
        # Split-K in one launch: add the partial sums into the fp32 workspace (relaxed: no fence
        # per add), count this column block's finished programs, and let the last one move the
        # sum into y (in y's dtype) and leave workspace and counter at zero for the next call.
        tl.atomic_add(ws_ptr + offs_n, acc, mask=n_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds come before the count (the release below)
        done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")  # one per program
        if done == tl.num_programs(1) - 1:  # the others' adds are visible (the acquire)
            total = tl.load(ws_ptr + offs_n, mask=n_mask, volatile=True)  # from L2, not L1
            tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty), mask=n_mask)
            tl.store(ws_ptr + offs_n, 0.0, mask=n_mask)
            tl.store(count_ptr + pid_n, 0)

    @triton.jit
    def _gemm_kernel(x_ptr, qw_ptr, qhi_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G: tl.constexpr,
                     BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, ROW_STATS: tl.constexpr,
                     DOT: tl.constexpr, SWAP: tl.constexpr):
        """y (M, N) = x (M, K) @ W^T without outliers (_outliers_kernel adds them after), for
        2..64 rows of x. Over the simple kernel: split-K (SPLIT_K > 1: atomic adds into a zeroed
        fp32 y), tensor cores in DOT (fp16/bf16; fp32 x: exact fp32 products), the weight tile
        made from whole words by _weights (fp16 magic number), SWAP: y^T = W x^T."""
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
            # for fp16 x the weights in fp16 arithmetic, else fp32 (then rounded to bf16)
            w = _weights(qw_ptr, qhi_ptr, s_ptr, z_ptr, k0, offs_n, N, K, G, BITS, BLOCK_K,
                         ROW_STATS, n_mask, tl.float16 if DOT == tl.float16 else tl.float32)
            if DOT == tl.float32:  # fp32 activations: exact fp32 products, no tf32
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            elif SWAP:  # y^T = W x^T: the weight tile as the first operand, (BLOCK_N, BLOCK_K),
                # which Hopper's wgmma takes from registers; BLOCK_N >= 64 rows make one
                acc += tl.trans(tl.dot(tl.trans(w.to(DOT)), tl.trans(x.to(DOT))))
            else:  # fp16 / bf16 tensor cores, fp32 accumulation
                acc += tl.dot(x.to(DOT), w.to(DOT))
        y = y_ptr + offs_m[:, None] * N + offs_n[None, :]
        mn_mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mn_mask)
        else:
            tl.atomic_add(y, acc, mask=mn_mask, sem="relaxed")

    @triton.jit
    def _dequant_kernel(qw_ptr, qhi_ptr, s_ptr, z_ptr, wt_ptr, N, K, G: tl.constexpr,
                        BITS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_STATS: tl.constexpr):
        """W^T (K, N) in wt's dtype, one (BLOCK_K, BLOCK_N) tile per program: the GEMM's weight
        tile (_weights) written out, for cuBLAS to multiply (the prefill path)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        OUT: tl.constexpr = tl.float16 if wt_ptr.dtype.element_ty == tl.float16 else tl.float32
        w = _weights(qw_ptr, qhi_ptr, s_ptr, z_ptr, k0, offs_n, N, K, G, BITS, BLOCK_K,
                     ROW_STATS, n_mask, OUT)
        tl.store(wt_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(wt_ptr.dtype.element_ty),
                 mask=(offs_k < K)[:, None] & n_mask[None, :])

    @triton.jit
    def _row_block(rowptr_ptr, N, ROWS: tl.constexpr):
        """Rows r0 .. r_end-1 of this program, their CSR entries start .. end-1, and where
        each row's entries end."""
        r0 = tl.program_id(1) * ROWS
        r_end = tl.minimum(r0 + ROWS, N)
        offs_r = r0 + tl.arange(0, ROWS)
        start, end = tl.load(rowptr_ptr + r0), tl.load(rowptr_ptr + r_end)
        row_end = tl.load(rowptr_ptr + 1 + offs_r, mask=offs_r < r_end, other=end)  # (ROWS,)
        return r0, offs_r, offs_r < r_end, start, end, row_end

    @triton.jit
    def _outliers_kernel(xt_ptr, rowptr_ptr, cols_ptr, vals_ptr, y_ptr, M, N,
                         BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """y[m, r] += sum of v * x[m, c] over the CSR entries (c, v) of row r, for BLOCK_M rows
        of x and ROWS rows of W per program. Runs after the GEMM; each program owns its tile of
        y, so no atomics. x comes transposed, x^T (K, M): the BLOCK_M values an entry needs,
        x[:, c], are then one contiguous run instead of BLOCK_M loads K apart."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        r0, offs_r, r_mask, start, end, row_end = _row_block(rowptr_ptr, N, ROWS)
        acc = tl.zeros((BLOCK_M, ROWS), dtype=tl.float32)
        for i0 in range(start, end, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            mask = offs < end
            col = tl.load(cols_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF  # int16
            v = tl.load(vals_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            # the row of entry i within the block: how many rows end at or before i
            row = tl.sum((offs[:, None] >= row_end[None, :]).to(tl.int32), axis=1)  # (BLOCK,)
            hit = row[:, None] == tl.arange(0, ROWS)[None, :]  # (BLOCK, ROWS) one-hot
            xv = tl.load(xt_ptr + col[None, :] * M + offs_m[:, None],
                         mask=m_mask[:, None] & mask[None, :], other=0.0).to(tl.float32)
            if BLOCK_M == 1:  # decode: a masked sum
                acc += tl.sum(tl.where(hit, (xv * v[None, :]).reshape(BLOCK, 1), 0.0),
                              axis=0)[None, :]
            else:  # (BLOCK_M, BLOCK) @ (BLOCK, ROWS) on the tensor cores' fp32 path
                acc += tl.dot(xv * v[None, :], hit.to(tl.float32), input_precision="ieee")
        y = y_ptr + offs_m[:, None] * N + offs_r[None, :]
        mask = m_mask[:, None] & r_mask[None, :]
        tl.store(y, (tl.load(y, mask=mask, other=0.0).to(tl.float32) + acc).to(
            y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_outliers_kernel(rowptr_ptr, cols_ptr, vals_ptr, wt_ptr, N,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """W^T[c, r] += v for the CSR entries (c, v) of ROWS rows r per program (each (r, c)
        once, so no atomics): the outliers of the dequantize-then-cuBLAS path."""
        r0, offs_r, r_mask, start, end, row_end = _row_block(rowptr_ptr, N, ROWS)
        for i0 in range(start, end, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            mask = offs < end
            col = tl.load(cols_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
            v = tl.load(vals_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            row = r0 + tl.sum((offs[:, None] >= row_end[None, :]).to(tl.int32), axis=1)
            w = wt_ptr + col * N + row
            tl.store(w, (tl.load(w, mask=mask, other=0.0).to(tl.float32) + v).to(
                wt_ptr.dtype.element_ty), mask=mask)


def config_for(M: int, N: int, K: int, G: int) -> dict:
    """The path and tile sizes quant_matmul uses for x (M, K) and W (N, K) in groups of G:
    the GEMV at M = 1, the GEMM up to M = 64, dequantize + cuBLAS above (chosen with
    `python scripts/bench_kernels.py --tune` on an H100). BLOCK_K is at least 32 (a 1-bit
    plane packs 32 codes per word) and stays inside one group when it can (G is a multiple
    of 32)."""
    BK = 64 if G % 64 == 0 else 32
    if M == 1 and N * K >= 2 ** 25:  # 32M weights
        # perf: on the Llama-3-8B MLP matrices (14336 x 4096, 4096 x 14336) 1024 x 32 tiles, two
        # K-tiles per program, were the fastest candidate at 2 and 3 bits and within 5% of it
        # at 4 bits (the 512 x 64 tile: 5-14% slower)
        return dict(path="gemv", BLOCK_N=1024, BLOCK_K=32, ITERS=2, num_warps=4)
    if M == 1:  # perf: q/o (4096 x 4096), k/v (1024 x 4096): a wider tile leaves fewer
        # programs for 132 SMs
        return dict(path="gemv", BLOCK_N=512, BLOCK_K=BK, ITERS=1, num_warps=4)
    if M <= 64:
        return dict(path="gemm", BLOCK_M=16 if M <= 16 else 64, BLOCK_N=64, BLOCK_K=BK,
                    SPLIT_K=max(1, min(8, K // 512)), num_warps=4, num_stages=3)
    return dict(path="dequant", BLOCK_N=64, BLOCK_K=BK, num_warps=4)


def new_workspace(N: int, device) -> torch.Tensor:
    """What the GEMV needs besides y: N fp32 partial sums and a counter per column block (at
    most N), int32 zeros (the bits of 0.0). The GEMV leaves it at zero, so one serves every call
    of one layer (QuantLinear keeps one); two launches must not share one at the same time."""
    return torch.zeros(2 * N, dtype=torch.int32, device=device)


def outlier_rows(t: dict) -> torch.Tensor:
    """The CSR row of every outlier entry, int32 (nnz,): what the GEMV reads instead of
    searching outlier_rowptr (QuantLinear computes it once)."""
    rowptr = t["outlier_rowptr"].to(torch.int64)
    N, nnz = rowptr.numel() - 1, t["outlier_vals"].numel()
    return torch.repeat_interleave(torch.arange(N, dtype=torch.int32, device=rowptr.device),
                                   rowptr[1:] - rowptr[:-1], output_size=nnz)  # (no sync)


def _launch_gemv(x2, t, y, N, K, g, bits, cfg, workspace, sum_rows=False):
    """The M = 1 kernel: y (1, N) = x2 (1, K) @ W^T (outliers included), in one launch.
    sum_rows: sum each row's run of outliers before its atomic add (see _outlier_adds)."""
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"] * cfg["ITERS"]))
    even = K % (cfg["BLOCK_K"] * cfg["ITERS"]) == 0 and N % cfg["BLOCK_N"] == 0
    ws, counts = workspace[:N].view(torch.float32), workspace[N:]
    nnz = t["outlier_vals"].numel() if "outlier_vals" in t else 0
    if nnz:
        rows = t["outlier_rows"] if "outlier_rows" in t else outlier_rows(t)
        csr = (t["outlier_rowptr"], rows, t["outlier_cols"], t["outlier_vals"])
    else:
        csr = (counts, counts, counts, ws)  # not read
    _gemv_kernel[grid](x2, *_packed_args(t), *csr, ws, counts, y, N, K, g, BITS=bits,
                       ROW_STATS=g % cfg["BLOCK_K"] == 0, EVEN=even, OUTLIERS=nnz > 0,
                       OUT_BLOCK=128, SUM_ROWS=sum_rows, **cfg)


def dequantize_t(t: dict, bits: int, groupsize: int, N: int, K: int, dtype,
                 config: Optional[dict] = None) -> torch.Tensor:
    """W^T (K, N) in dtype with the Triton kernels (the prefill path, before cuBLAS): every
    s (q - z) rounded once to dtype, as dequantize(t, ...).T.to(dtype) rounds it; the outliers
    are then added in fp32 and rounded again."""
    g = K if groupsize in (-1, None) else groupsize
    cfg = config or config_for(256, N, K, g)  # the prefill path's tiles
    cfg = {k: v for k, v in cfg.items() if k in ("BLOCK_N", "BLOCK_K", "num_warps")}
    wt = torch.empty(K, N, device=t["qweight"].device, dtype=dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))
    _dequant_kernel[grid](*_packed_args(t), wt, N, K, g, BITS=bits,
                          ROW_STATS=g % cfg["BLOCK_K"] == 0, **cfg)
    if "outlier_vals" in t and t["outlier_vals"].numel():
        _add_outliers_kernel[(1, triton.cdiv(N, 16))](
            t["outlier_rowptr"], t["outlier_cols"], t["outlier_vals"], wt, N, ROWS=16,
            BLOCK=128)
    return wt


def _output(M: int, N: int, dtype, device) -> torch.Tensor:
    """y for a kernel that writes every element itself: uninitialised on a GPU, NaN under the
    interpreter (the tests), so an element a kernel failed to write shows up."""
    if os.environ.get("TRITON_INTERPRET"):
        return torch.full((M, N), float("nan"), device=device, dtype=dtype)
    return torch.empty(M, N, device=device, dtype=dtype)


def quant_matmul(x: torch.Tensor, t: dict, bits: int, groupsize: int, N: int, K: int,
                 config: Optional[dict] = None,
                 workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W^T for W in the packed format, with the Triton kernels; x (..., K) fp16, bf16 or
    fp32, y in x's dtype. workspace: new_workspace(N) for the M = 1 kernel, reused across calls
    (a fresh one per call if None). On a CPU this runs under TRITON_INTERPRET=1 (tests)."""
    if triton is None:
        raise RuntimeError("the Triton path needs the triton package: pip install triton")
    shape = x.shape
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    g = K if groupsize in (-1, None) else groupsize
    cfg = dict(config or config_for(M, N, K, g))
    path = cfg.pop("path")
    fused = cfg.pop("fused_outliers", True)  # M = 1: outliers inside the GEMV or after it
    sum_rows = cfg.pop("sum_rows", False)  # M = 1: one atomic add per run of a row's outliers
    swap = cfg.pop("swap", False)  # 2..64: the weight tile as tl.dot's first operand
    row_stats = g % cfg["BLOCK_K"] == 0  # every K-tile inside one group
    nnz = t["outlier_vals"].numel() if "outlier_vals" in t else 0
    args = _packed_args(t)
    if path == "dequant":  # W^T once in x's dtype, then cuBLAS
        y = x2 @ dequantize_t(t, bits, g, N, K, x.dtype, cfg)
    elif path == "gemv":  # y written by the kernel in x's dtype
        after = nnz and not fused  # fp32 y for the outlier kernel, then one rounding
        y = _output(M, N, torch.float32 if after else x.dtype, x.device)
        if workspace is None:
            workspace = new_workspace(N, x.device)
        dense = {k: v for k, v in t.items() if not k.startswith("outlier_")}
        _launch_gemv(x2, dense if after else t, y, N, K, g, bits, cfg, workspace, sum_rows)
    else:  # the GEMM
        # split-K programs add into fp32 zeros (native atomic adds; fp16 ones are a
        # compare-and-swap loop), cast after; a single program per tile writes y itself, in
        # x's dtype (fp32 when outliers are added after it, for one rounding)
        if cfg["SPLIT_K"] > 1:
            y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
        else:
            y = _output(M, N, torch.float32 if nnz else x.dtype, x.device)
        dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(x.dtype, tl.float32)
        if os.environ.get("TRITON_INTERPRET") and dot == tl.bfloat16:
            dot = tl.float32  # the CPU interpreter has no bf16 arithmetic
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        _gemm_kernel[grid](x2, *args, y, M, N, K, g, BITS=bits, ROW_STATS=row_stats, DOT=dot,
                           SWAP=swap, **cfg)
    if nnz and (path == "gemm" or (path == "gemv" and not fused)):  # after the dense part
        BM = 1 if M == 1 else 16 if M <= 16 else 64  # its own row tile (tl.dot needs >= 16)
        grid = (triton.cdiv(M, BM), triton.cdiv(N, 16))
        xt = x2.t().contiguous()  # (K, M); at M = 1 the same memory, no copy
        _outliers_kernel[grid](xt, t["outlier_rowptr"], t["outlier_cols"], t["outlier_vals"], y,
                               M, N, BLOCK_M=BM, ROWS=16, BLOCK=128 if BM == 1 else 64)
    return y.to(x.dtype).reshape(*shape[:-1], N)


# -----------------------------------------------------------------------------
# The module model.py swaps in for a quantized nn.Linear


@torch.library.custom_op("mixq::quant_matmul", mutates_args=())
def quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, qweight_hi: Optional[torch.Tensor],
                    scales: torch.Tensor, zeros: torch.Tensor,
                    outlier_rowptr: Optional[torch.Tensor], outlier_cols: Optional[torch.Tensor],
                    outlier_vals: Optional[torch.Tensor], outlier_rows: Optional[torch.Tensor],
                    workspace: Optional[torch.Tensor], bits: int, groupsize: int, N: int,
                    K: int) -> torch.Tensor:
    """quant_matmul as one opaque torch operator (the packed tensors spelled out, absent ones
    None), so torch.compile calls it as it is instead of tracing the launches inside. The
    workspace is used and left at zero as it came, so no argument counts as mutated."""
    t = {"qweight": qweight, "qweight_hi": qweight_hi, "scales": scales, "zeros": zeros,
         "outlier_rowptr": outlier_rowptr, "outlier_cols": outlier_cols,
         "outlier_vals": outlier_vals, "outlier_rows": outlier_rows}
    return quant_matmul(x, {k: v for k, v in t.items() if v is not None}, bits, groupsize, N, K,
                        workspace=workspace)


@quant_matmul_op.register_fake
def _(x, qweight, qweight_hi, scales, zeros, outlier_rowptr, outlier_cols, outlier_vals,
      outlier_rows, workspace, bits, groupsize, N, K):
    return x.new_empty(*x.shape[:-1], N)


class QuantLinear(nn.Module):
    """y = x @ W^T with W stored in the packed format above.

    On CUDA it runs the Triton kernels (quant_matmul, called as the custom operator
    quant_matmul_op). Elsewhere (a CPU) the weight is dequantized at the first call, kept, and
    multiplied with F.linear: the fp model's speed and memory, the same numbers up to summation
    order."""

    def __init__(self, in_features, out_features, bits, groupsize, tensors: dict):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.groupsize = bits, groupsize
        z = tensors["zeros"]
        if not torch.equal(z, z.round()) or z.abs().max() > 1024:  # the kernels' q - z is
            # (1024 + q) - (1024 + z) in fp16: exact for integers of at most 1024
            raise ValueError("zeros must be integer zero points in [-1024, 1024] (the packed "
                             "format)")
        for name, value in tensors.items():
            self.register_buffer(name, value)
        # for the decode GEMV, not saved: its scratch (zeros) and each outlier's row
        dev = tensors["qweight"].device
        self.register_buffer("workspace", new_workspace(out_features, dev), persistent=False)
        if "outlier_vals" in tensors:
            self.register_buffer("outlier_rows", outlier_rows(tensors), persistent=False)
        self.dense = None  # the dequantized W, made at the first call off the GPU

    def stored(self) -> dict:
        """The packed tensors (the format above), without what the kernels derive from them."""
        return {k: v for k, v in self.named_buffers() if k not in ("workspace", "outlier_rows")}

    def dequantized_weight(self) -> torch.Tensor:
        """W (N, K) in fp32."""
        return dequantize(self.stored(), self.bits, self.groupsize, self.out_features,
                          self.in_features)

    def forward(self, x):
        if use_triton(x):
            t = dict(self.named_buffers())
            return quant_matmul_op(x, t["qweight"], t.get("qweight_hi"), t["scales"], t["zeros"],
                                   t.get("outlier_rowptr"), t.get("outlier_cols"),
                                   t.get("outlier_vals"), t.get("outlier_rows"), self.workspace,
                                   self.bits, self.groupsize, self.out_features,
                                   self.in_features)
        # perf: on a CPU the weight is dequantized once and kept: dequantizing on every call
        # makes decoding 6x slower than the fp model, and torch's 4-bit CPU matmul
        # (_weight_int4pack_mm_for_cpu) is slower still (docs/cpu.md)
        if self.dense is None or (self.dense.device, self.dense.dtype) != (x.device, x.dtype):
            self.dense = self.dequantized_weight().to(x.device, x.dtype)
        return F.linear(x, self.dense)

    def extra_repr(self):
        g = "per-channel" if self.groupsize in (-1, None) else f"g{self.groupsize}"
        nnz = self.outlier_vals.numel() if hasattr(self, "outlier_vals") else 0
        return (f"in={self.in_features}, out={self.out_features}, {self.bits}-bit {g}, "
                f"{nnz} outliers")


def stack_quant_linears(linears: list) -> Optional[QuantLinear]:
    """One QuantLinear whose output is the outputs of `linears` (same input) side by side, or
    None if they differ in K, bits or group size. The format stacks along N as it is: codes,
    scales and zeros are column blocks (., N), and the CSR rows of the outliers follow one
    another (each row pointer shifted by the entries before it)."""
    a = linears[0]
    if any((m.in_features, m.bits, m.groupsize) != (a.in_features, a.bits, a.groupsize)
           for m in linears):
        return None
    ts = [m.stored() for m in linears]
    t = {k: torch.cat([x[k] for x in ts], dim=1) for k in ts[0] if not k.startswith("outlier_")}
    if any("outlier_vals" in x for x in ts):
        dev = a.qweight.device
        rowptrs, cols, vals, before = [torch.zeros(1, dtype=torch.int32, device=dev)], [], [], 0
        for m, x in zip(linears, ts):
            rp = x.get("outlier_rowptr", torch.zeros(m.out_features + 1, dtype=torch.int32,
                                                     device=dev))
            rowptrs.append(rp[1:] + before)
            before += int(rp[-1])
            cols.append(x.get("outlier_cols", torch.zeros(0, dtype=torch.int16, device=dev)))
            vals.append(x.get("outlier_vals", torch.zeros(0, dtype=torch.float16, device=dev)))
        t |= {"outlier_rowptr": torch.cat(rowptrs), "outlier_cols": torch.cat(cols),
              "outlier_vals": torch.cat(vals)}
    return QuantLinear(a.in_features, sum(m.out_features for m in linears), a.bits, a.groupsize,
                       t)


# -----------------------------------------------------------------------------
# ResQ in integer arithmetic: activations and weights both as integer codes
#
# A ResQ linear (mixq.py's resq) reads its K input channels in slices, each with bits of its own:
# for q/k/v/gate/up the low K - r channels at 4 bits and the high r (the top PCA directions) at
# 8; for o_proj the same split inside every head; down_proj one slice. Inside a slice the input
# has one asymmetric grid per token and per group of G consecutive channels (G = the slice for
# q/k/v/gate/up/down, a head's share of it for o_proj), the weight one symmetric grid per row:
#   x[m, k] = sx[m, j] (cx[m, k] - zx[m, j])     cx in [0, 2^a - 1], k in group j
#   W[n, k] = sw[n] qw[n, k]                     qw in [-2^(b-1), 2^(b-1) - 1]
# so that
#   y[m, n] = sw[n] sum_j sx[m, j] (sum_{k in j} cx[m, k] qw[n, k] - zx[m, j] sum_{k in j} qw[n, k])
# The inner sums are integer products, exact in int32; the column sums of qw are fixed. Codes
# go to int8 as cx - 2^(a-1) and zx - 2^(a-1) (the same difference), which fits 8-bit codes too.
#
# The stored tensors of one ResQ linear, slice i covering channels [start_i, start_i + K_i):
#   qweight_i  int32 (K_i*b_i/32, N)  qw + 2^(b_i-1) packed along K (`pack`; b_i in 2, 4, 8)
#   scale_i    fp16 (N,)              sw of the slice
#   perm       int64 (K,), optional   the channels in slice order (o_proj: every head's low
#                                     channels, then every head's high ones)
# with each slice's (K_i, b_i, a_i, G_i, zero_in_range_i) in the module's config.


def round_up_fp16(s: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= s (s > 0), in s's dtype (mixq.py's grids store scales so)."""
    h = s.half()
    h = torch.where(h.to(s.dtype) < s, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.to(s.dtype)


def activation_codes(x: torch.Tensor, bits: int, zero_in_range: bool = True):
    """Per-row asymmetric min-max grid of x (R, G) fp32 -> codes (R, G) in [0, 2^bits - 1] (as
    floats), scales and zeros (R, 1): the numbers of mixq.quantize_activations."""
    maxq = 2 ** bits - 1
    xmin, xmax = torch.aminmax(x, dim=1, keepdim=True)
    if zero_in_range:
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    flat = xmax == xmin  # an all-equal row gets a unit range
    xmin, xmax = torch.where(flat, xmin - 1, xmin), torch.where(flat, xmax + 1, xmax)
    s = round_up_fp16((xmax - xmin) / maxq)
    z = torch.round(-xmin / s)
    return (x / s).add_(z).round_().clamp_(0, maxq), s, z  # clamp(round(x/s + z), 0, maxq)


def signed_codes(qweight: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """The weight codes qw (K, N) int8 of a packed slice: its unsigned codes - 2^(bits-1)."""
    return (unpack(qweight, bits, K).to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def int_matmul_reference(a: torch.Tensor, qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """P = a @ qw (M, N) int32 for a (M, K) int8 and the packed codes of qw (K, N), in int64."""
    qw = signed_codes(qweight, bits, a.shape[1])
    return (a.to(torch.int64) @ qw.to(torch.int64)).to(torch.int32)


if triton is not None:

    @triton.jit
    def _int_matmul_kernel(a_ptr, qw_ptr, p_ptr, M, N, K, BITS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """P (M, N) int32 = a (M, K) int8 @ qw (K, N), qw from its packed unsigned codes: each
        word's code shifted down and masked, minus 2^(BITS-1), into an int8 tile for tl.dot."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        PER: tl.constexpr = 32 // BITS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
            word = tl.load(qw_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :],
                           mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0)
            q = (word >> ((offs_k % PER) * BITS)[:, None]) & ((1 << BITS) - 1)
            q = tl.where(offs_k[:, None] < K, q - (1 << (BITS - 1)), 0).to(tl.int8)
            acc += tl.dot(a, q, out_dtype=tl.int32)
        tl.store(p_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def int_matmul(a: torch.Tensor, qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int_matmul_reference's P with _int_matmul_kernel (Triton: a GPU, or the CPU interpreter)."""
    if triton is None:
        raise RuntimeError("the Triton path needs the triton package: pip install triton")
    a = a.contiguous()
    M, K = a.shape
    N = qweight.shape[1]
    P = torch.empty(M, N, dtype=torch.int32, device=a.device)
    BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64  # int8 tl.dot: tiles of at least 16 (32 along K)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _int_matmul_kernel[grid](a, qweight, P, M, N, K, BITS=bits, BLOCK_M=BLOCK_M,
                             BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return P


def scaled(P: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
    """P ss rounded once to fp32, for int32 sums P and fp32 scales ss that are products of two
    fp16 values (so exact): in fp32 when every |P| <= 2^24 (exact as floats), else in fp64."""
    lo, hi = torch.aminmax(P)
    if max(-int(lo), int(hi)) <= 2 ** 24:
        return torch.mul(P, ss)
    return torch.mul(P.double(), ss.double()).float()


# perf: below this many rows (tokens x groups) the groups of a slice share one product, each
# group's codes in a row block of their own (zeros elsewhere): o_proj's per-head groups at
# decode are one call instead of one per head; above it the zeros would cost more than calls
SMALL_ROWS = 64


class ResQLinear(nn.Module):
    """y = x @ W^T with x quantized per token and W per row, both in slices (the format above),
    computed as integer products: torch._int_mm on a CPU (exact int8 x int8 -> int32), the
    Triton kernel on a GPU. slices: one dict per slice, {"width": K_i, "bits": b_i, "act_bits":
    a_i, "group": G_i, "zero_in_range": bool}; tensors: qweight_i, scale_i and perm (optional)."""

    def __init__(self, in_features, out_features, slices: list, tensors: dict):
        super().__init__()
        self.in_features, self.out_features, self.slices = in_features, out_features, slices
        acts = {sl["act_bits"] >= 16 for sl in slices}
        if sum(sl["width"] for sl in slices) != in_features or len(acts) > 1 or any(
                sl["width"] % sl["group"] or sl["bits"] not in (2, 4, 8) or
                not (2 <= sl["act_bits"] <= 8 or sl["act_bits"] == 16) for sl in slices):
            raise ValueError(f"ResQ slices {slices} do not fit {in_features} input channels "
                             "(widths summing to it, groups dividing them, 2/4/8-bit weights, "
                             "2-8-bit activations, or 16 for all)")
        for name, value in tensors.items():
            self.register_buffer(name, value)
        self.codes = None  # the int8 weight codes (K_i, N) of each slice, unpacked at first use
        self.colsums = None  # sum_k qw[k, n] over each group of each slice, (K_i/G_i, N) int32
        self.dense = None  # W (N, K), for unquantized (16-bit) activations

    def weight_codes(self) -> list:
        if self.codes is None or self.codes[0].device != self.qweight_0.device:  # (moved)
            self.codes = [signed_codes(getattr(self, f"qweight_{i}"), sl["bits"], sl["width"])
                          for i, sl in enumerate(self.slices)]
            self.colsums = [qw.view(sl["width"] // sl["group"], sl["group"], -1).sum(
                1, dtype=torch.int32) for sl, qw in zip(self.slices, self.codes)]
        return self.codes

    def dequantized_weight(self) -> torch.Tensor:
        """W (N, K) fp32 in the input's own channel order."""
        W = torch.cat([getattr(self, f"scale_{i}").float()[:, None] * qw.T.float()
                       for i, qw in enumerate(self.weight_codes())], dim=1)
        if hasattr(self, "perm"):
            W = W[:, torch.argsort(self.perm)]
        return W.contiguous()  # row-major, as an nn.Linear's weight (the same BLAS sums)

    def forward(self, x):
        if self.slices[0]["act_bits"] >= 16:  # W4A16: the weight dequantized once, F.linear
            if self.dense is None or (self.dense.device, self.dense.dtype) != (x.device, x.dtype):
                self.dense = self.dequantized_weight().to(x.device, x.dtype)
            return F.linear(x, self.dense)
        M, N = x.numel() // self.in_features, self.out_features
        x2 = x.reshape(M, self.in_features).float()
        if hasattr(self, "perm"):
            x2 = x2[:, self.perm]
        # y = sum over slices i and groups j of sx sw P, each term rounded once to fp32 (sx sw
        # is exact in fp32, P too below 2^24) and the terms summed in fp32 in that order: the
        # numbers of mixq's fake quantization (FakeQuantLinear), bit for bit
        y, start = None, 0
        for i, (sl, qw) in enumerate(zip(self.slices, self.weight_codes())):
            K, G, a = sl["width"], sl["group"], sl["act_bits"]
            xs = x2[:, start:start + K].reshape(M * K // G, G)  # a row per token and group
            c, s, z = activation_codes(xs, a, sl["zero_in_range"])
            c = c.sub_(2 ** (a - 1)).to(torch.int8).reshape(M, K)
            s = s.reshape(M, K // G)
            z = (z - 2 ** (a - 1)).reshape(M, K // G).to(torch.int32)
            sw, n = getattr(self, f"scale_{i}").float(), K // G  # n groups
            if M * n <= SMALL_ROWS:  # perf: every group in one product (zeros elsewhere)
                blocks = c.new_zeros(n, M, n, G)  # row block j holds group j's codes
                blocks[torch.arange(n), :, torch.arange(n)] = c.view(M, n, G).transpose(0, 1)
                P = self.product(blocks.view(n * M, K), qw, i).view(n, M, N)
                P -= z.T[:, :, None] * self.colsums[i][:, None, :]  # (n, M, N) int32
                terms = scaled(P, s.T[:, :, None] * sw).unbind(0)
            else:
                terms = []
                for j in range(n):  # sx_j sw (sum cx qw - zx_j sum qw), the sums exact
                    P = self.product(c[:, j * G:(j + 1) * G], qw[j * G:(j + 1) * G], i, j)
                    P.addr_(z[:, j], self.colsums[i][j], alpha=-1)  # P -= zx_j sum qw
                    terms.append(scaled(P, s[:, j:j + 1] * sw))
            for t in terms:
                y = t if y is None else y.add_(t)
            start += K
        return y.to(x.dtype).reshape(*x.shape[:-1], N)

    def product(self, c, qw, i: int, j: Optional[int] = None) -> torch.Tensor:
        """The int32 sums c (M, G) int8 @ qw (G, N) int8 of group j of slice i (j None: the
        whole slice)."""
        if use_triton(c):
            sl = self.slices[i]
            qweight = getattr(self, f"qweight_{i}")
            if j is not None:
                words, part = divmod(sl["group"] * sl["bits"], 32)  # the group's packed rows
                if part:
                    raise ValueError(f"{sl['bits']}-bit codes of a {sl['group']}-channel group "
                                     "do not fill whole words, which the Triton kernel reads")
                qweight = qweight[j * words:(j + 1) * words]
            return int_matmul(c, qweight, sl["bits"])
        return torch._int_mm(c, qw)

    def extra_repr(self):
        parts = ", ".join(f"{sl['width']} x W{sl['bits']}A{sl['act_bits']}" +
                          (f" g{sl['group']}" if sl["group"] < sl["width"] else "")
                          for sl in self.slices)
        return f"in={self.in_features}, out={self.out_features}, {parts}"


def stack_resq_linears(linears: list) -> Optional[ResQLinear]:
    """One ResQLinear whose output is the outputs of `linears` (same input) side by side, or
    None if they read their input differently (slices or perm): weight codes and scales are
    column blocks (., N), so they stack along N as they are; the input is quantized once."""
    a = linears[0]

    def same_input(m):
        p, q = getattr(m, "perm", None), getattr(a, "perm", None)
        return (m.in_features, m.slices) == (a.in_features, a.slices) and (
            p is None and q is None or p is not None and q is not None and torch.equal(p, q))
    if not all(same_input(m) for m in linears):
        return None
    t = {"perm": a.perm} if hasattr(a, "perm") else {}
    for i in range(len(a.slices)):
        t[f"qweight_{i}"] = torch.cat([getattr(m, f"qweight_{i}") for m in linears], dim=1)
        t[f"scale_{i}"] = torch.cat([getattr(m, f"scale_{i}") for m in linears])
    return ResQLinear(a.in_features, sum(m.out_features for m in linears), a.slices, t)


# -----------------------------------------------------------------------------
# Calibration on the GPU: the column loops of QuantEase and GPTQ (mixq.cd_block and
# mixq.gptq_block are the readable torch versions of the same numbers)
#
# Both algorithms walk the columns of a block one at a time, every row at once; in torch each
# column is a dozen tiny kernels, so a GPU spends its time launching them. Here one launch does
# a block: each program keeps BLOCK_R rows of the block's columns in registers and walks the
# columns in order. Extracting column j of a register tile is a masked sum (exact: one nonzero).
#
# QuantEase: one block of columns b1 <= j < b2 of a coordinate-descent sweep. Column j
# (i = j - b1) gets  u = R_i - sum_{l < i} D_l S[b1 + l, j]  (R = the block's P - Phat, D the
# changes made so far in the block) rounded to its row's grid: s * (clamp(round(u/s + z), 0,
# maxq) - z).
# GPTQ: column i of a block is rounded to its grid (or kept, TaCQ/SpQR), and its scaled error
# e_i = (w_i - q_i) / U_ii is spread onto the block's later columns: W[:, j > i] -= e_i U_ij.

if triton is not None:

    @triton.jit
    def _round_half_even(x):
        """torch.round: to the nearest integer, ties to even (x small enough to be exact)."""
        r = tl.floor(x + 0.5)
        odd = r - 2 * tl.floor(r * 0.5) == 1
        return tl.where((r - x == 0.5) & odd, r - 1, r)

    @triton.jit
    def _cd_block_kernel(What, R, S, Sc, Z, D, m, n, b1, width, maxq,
                         ROUNDED: tl.constexpr, B: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, B)
        inside = (rows[:, None] < m) & (cols[None, :] < width)
        full = rows[:, None].to(tl.int64) * n + b1 + cols[None, :]  # in the (m, n) matrices
        blk = rows[:, None].to(tl.int64) * width + cols[None, :]  # in the (m, width) ones
        w = tl.load(What + full, mask=inside, other=0.0)  # (BLOCK_R, B) current values
        r = tl.load(R + blk, mask=inside, other=0.0)
        s = tl.load(Sc + full, mask=inside, other=1.0)  # the fixed grid
        z = tl.load(Z + full, mask=inside, other=0.0)
        d = tl.zeros((BLOCK_R, B), dtype=w.dtype)  # changes so far; 0 from column j on
        for j in range(0, width):
            at_j = cols[None, :] == j
            S_lj = tl.load(S + (b1 + cols).to(tl.int64) * n + b1 + j, mask=cols < width,
                           other=0.0)  # S[b1 + l, b1 + j] over l (S the normalized Sigma)
            u = tl.sum(tl.where(at_j, r, 0.0), 1) - tl.sum(d * S_lj[None, :], 1)
            if ROUNDED:
                s_j, z_j = tl.sum(tl.where(at_j, s, 0.0), 1), tl.sum(tl.where(at_j, z, 0.0), 1)
                c = tl.minimum(tl.maximum(u / s_j + z_j, -1.0), maxq + 1.0)
                u = s_j * (tl.minimum(tl.maximum(_round_half_even(c), 0.0), maxq) - z_j)
            w_j = tl.sum(tl.where(at_j, w, 0.0), 1)
            d = tl.where(at_j, (u - w_j)[:, None], d)
            w = tl.where(at_j, u[:, None], w)
        tl.store(What + full, w, mask=inside)
        tl.store(D + blk, d, mask=inside)

    @triton.jit
    def _gptq_block_kernel(W1, U1, Sc, Z, Maxq, Keep, Codes, Qv, Err, m, width, tau,
                           SPQR: tl.constexpr, B: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, B)
        inside = (rows[:, None] < m) & (cols[None, :] < width)
        offs = rows[:, None].to(tl.int64) * width + cols[None, :]  # every tensor is (m, width)
        w = tl.load(W1 + offs, mask=inside, other=0.0)  # (BLOCK_R, B), updated column by column
        s = tl.load(Sc + offs, mask=inside, other=1.0)
        z = tl.load(Z + offs, mask=inside, other=0.0)
        keep = tl.load(Keep + offs, mask=inside, other=0)
        maxq = tl.load(Maxq + cols, mask=cols < width, other=0.0)
        codes = tl.zeros((BLOCK_R, B), dtype=w.dtype)
        qv = tl.zeros((BLOCK_R, B), dtype=w.dtype)
        err = tl.zeros((BLOCK_R, B), dtype=w.dtype)
        for i in range(0, width):
            at_i = cols[None, :] == i
            w_i = tl.sum(tl.where(at_i, w, 0.0), 1)
            s_i, z_i = tl.sum(tl.where(at_i, s, 0.0), 1), tl.sum(tl.where(at_i, z, 0.0), 1)
            maxq_i = tl.sum(tl.where(cols == i, maxq, 0.0), 0)
            u_ii = tl.load(U1 + i * width + i)
            c = tl.minimum(tl.maximum(w_i / s_i + z_i, -1.0), maxq_i + 1.0)
            c = tl.minimum(tl.maximum(_round_half_even(c), 0.0), maxq_i)
            q = s_i * (c - z_i)
            k_i = tl.sum(tl.where(at_i, keep, 0), 1) != 0
            if SPQR:  # the grid serves this weight too badly: keep it in 16 bits
                e = (w_i - q) / u_ii
                k_i = k_i | (e * e > tau)
                keep = tl.where(at_i, k_i.to(keep.dtype)[:, None], keep)
            # kept weights: the code whose value is 0 (the stored correction is the weight),
            # q = w_i, so e = 0 there
            c = tl.where(k_i, tl.minimum(tl.maximum(_round_half_even(z_i), 0.0), maxq_i), c)
            q = tl.where(k_i, w_i, q)
            e = (w_i - q) / u_ii
            u_row = tl.load(U1 + i * width + cols, mask=cols < width, other=0.0)  # 0 left of i
            w = w - e[:, None] * u_row[None, :]  # W[:, j >= i] -= e_i U_ij
            codes = tl.where(at_i, c[:, None], codes)
            qv = tl.where(at_i, q[:, None], qv)
            err = tl.where(at_i, e[:, None], err)
        tl.store(Codes + offs, codes, mask=inside)
        tl.store(Qv + offs, qv, mask=inside)
        tl.store(Err + offs, err, mask=inside)
        tl.store(Keep + offs, keep, mask=inside)


def use_triton(x: torch.Tensor) -> bool:
    """The Triton kernels run for CUDA tensors, unless MIXQ_TORCH_PATH is set."""
    return x.is_cuda and triton is not None and not os.environ.get("MIXQ_TORCH_PATH")


def cd_block(What, R, S, s, z, b1: int, b2: int, maxq: int, rounded: bool = True):
    """Columns b1..b2-1 of a QuantEase sweep, in place on What (m, n); R = (P - Phat)[:, b1:b2],
    S (n, n) the normalized off-diagonal, s, z (m, n) the grid. Returns D (m, b2 - b1), the
    changes made (for the torch GEMM that carries them to the later columns)."""
    m, n = What.shape
    width = b2 - b1
    assert What.is_contiguous() and S.is_contiguous() and s.is_contiguous() and z.is_contiguous()
    R = R.contiguous()
    D = torch.empty_like(R)
    B = max(16, triton.next_power_of_2(width))
    BLOCK_R = 8  # 8 x 128 fp32 tiles: no register spills on sm_90 (scripts/compile_kernels.py)
    _cd_block_kernel[(triton.cdiv(m, BLOCK_R),)](What, R, S, s, z, D, m, n, b1, width,
                                                 float(maxq), ROUNDED=rounded, B=B,
                                                 BLOCK_R=BLOCK_R)
    return D


def gptq_block(W1, U1, s, z, maxq, mask, tau: float):
    """One block of GPTQ's columns (mixq.gptq_block, same arguments and results) in one launch:
    each program keeps BLOCK_R rows of the block in registers and quantizes the columns in
    order, spreading each column's error on the later ones through U1's row."""
    m, width = W1.shape
    assert s.shape == W1.shape, "the kernel quantizes every column of W1"
    W1, U1, s, z = W1.contiguous(), U1.contiguous(), s.contiguous(), z.contiguous()
    keep = mask.to(torch.uint8)  # updated in place by SpQR's rule
    codes, Q, Err = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
    BLOCK_R = 8  # 8 x 128 fp32 tiles: no register spills on sm_90 (scripts/compile_kernels.py)
    _gptq_block_kernel[(triton.cdiv(m, BLOCK_R),)](
        W1, U1, s, z, maxq.to(W1.dtype).contiguous(), keep, codes, Q, Err, m, width,
        float(min(tau, 3e38)), SPQR=tau < float("inf"), B=max(16, triton.next_power_of_2(width)),
        BLOCK_R=BLOCK_R)
    return codes, Q, Err, keep.bool()
