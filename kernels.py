"""kernels.py: the packed low-bit weight format of mixq and y = x @ dequant(Wq)^T.

This file imports torch (and, for the GPU kernel, triton) and nothing of ours, so it can be copied
alone. This version holds the format and the plain torch path that every device can run; the
Triton GEMM (issue: kernels.py) plugs into `QuantLinear.forward` on CUDA.

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

import torch
import torch.nn as nn
import torch.nn.functional as F

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
# The module model.py swaps in for a quantized nn.Linear


class QuantLinear(nn.Module):
    """y = x @ W^T with W stored in the packed format above.

    On the CPU (and until the Triton kernel is used) the weight is dequantized to the activation
    dtype on every call and multiplied with F.linear: simple and exact, not fast."""

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
        return F.linear(x, self.dequantized_weight().to(x.dtype))

    def extra_repr(self):
        g = "per-channel" if self.groupsize in (-1, None) else f"g{self.groupsize}"
        nnz = self.outlier_vals.numel() if hasattr(self, "outlier_vals") else 0
        return (f"in={self.in_features}, out={self.out_features}, {self.bits}-bit {g}, "
                f"{nnz} outliers")
