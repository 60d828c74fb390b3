"""mixq.py: mixed-precision post-training quantization of Llama models.

Every algorithm is a pure function on tensors: a weight W (m out x n in), the layer statistics
(H = 2 X X^T / N, or Sigma = X X^T / N) and options, returning a `Quantized` (codes on a grid,
scales, zeros, and any weights kept in 16 bits). The layer-wise pipeline feeds them.

Sections (each method opens with the paper's version, a short function; the fast version
follows, and a test checks that both give the same result)
  1. The grid          uniform asymmetric / symmetric quantizer, min-max or MSE clipping
  2. RTN               round to nearest
  3. GPTQ              Frantar et al. 2022, arXiv 2210.17323: gptq_paper, then gptq. With an
                       optional mask of 16-bit weights (TaCQ) and SpQR-style outliers chosen
                       by an error threshold (Dettmers et al. 2023, arXiv 2306.03078)
  4. QuantEase         Behdin et al. 2023, arXiv 2309.01885: quantease_paper, then quantease
                       (coordinate descent on a fixed grid) and quantease_outliers (CD +
                       iterative hard thresholding)
  5. Bit count         one function for every method
  6. Pipeline          layer-wise, true-sequential, one block at a time: quantize_model;
                       solve and solve_group, where the column loops (torch or Triton)
                       and the threads are decided: the math carries neither
  7. TaCQ              Xiao et al. 2025, arXiv 2504.07389: tacq, the steps in order (gradient
                       saliency, a global 16-bit budget, GPTQ with that mask)
  8. ResQ              Saxena et al. 2024, arXiv 2412.14363: resq, the steps in order (norm
                       folding, PCA bases, random rotations fused into the weights, online key
                       rotation and Hadamard; then W4A4KV4 fake quantization, 8-bit high slice)
  9. Save, export     packed codes (the format in kernels.py), atomically; the same codes in
                       the GPTQ and compressed-tensors formats other tools serve
  10. CLI              python mixq.py [--ckpt X] --method gptq --wbits 3 --groupsize 64 ...
                       (every flag is a field of Job or QuantConfig); run, the whole job

Run `python mixq.py --help` for every option; `python mixq.py` runs the default job (TaCQ, 3 bits
per channel, ratio 0.0035, on the embedded SmolLM2-135M-Instruct, calibrated on the pydoc
calibration split).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import re
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F



class Missing:
    """Stands in for a project file that is not beside mixq.py: using it raises the import
    error. The algorithms (sections 1-5) need torch only, so mixq.py can be copied alone for
    them; loading models, the pipeline, evaluation and the CLI need model.py, eval.py and
    kernels.py."""

    def __init__(self, error: ImportError):
        self.error = error

    def __getattr__(self, name):
        raise ImportError(f"this part of mixq needs the rest of the project: {self.error}")


try:
    import model as llama
except ImportError as e:
    llama = Missing(e)
try:
    import eval as metrics
except ImportError as e:
    metrics = Missing(e)
try:
    kernels = llama.import_kernels()  # our kernels.py, not Hugging Face's package of that name
except ImportError as e:
    kernels = Missing(e)


# -----------------------------------------------------------------------------
# 1. The grid
#
# One grid per row and group: Q(x) = s * (clamp(round(x/s + z), 0, maxq) - z), maxq = 2^b - 1.
#   asymmetric: s = (xmax - xmin) / maxq, z = round(-xmin / s)
#   symmetric:  xmax = max(|xmin|, xmax), xmin = -xmax, z = (maxq + 1) / 2  (unsigned codes)
# With zero_in_range (the GPTQ convention) the range always contains 0, so 0 is exact.
# Scales are rounded up to fp16, the precision they are stored in, so the in-memory model and a
# saved-then-loaded one are the same numbers, and the range is still covered. Every grid does
# this, the MSE search's candidates and the activation quantizers included, where the papers'
# codes keep the working precision.


def option(default, help: str, **cli):
    """A config field that is also a command-line flag (--name, or cli["flag"]): its help text
    and any other argparse settings (choices, type, action) ride in the field's metadata."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class QuantConfig:
    """The options of every method; those with help are mixq.py's flags."""
    wbits: int = option(3, "bits per weight code (2-8)")
    groupsize: int = option(-1, "input columns per scale and zero; -1: one group per output row")
    sym: bool = option(False, "symmetric grid (GPTQ's convention: unsigned codes, fixed mid zero)")
    signed: bool = False  # with sym: the scale of QuaRot's and ResQ's signed grid (scale_zero)
    mse: bool = option(False, "MSE clipping search for each grid (always on for tacq and resq)")
    percdamp: float = option(0.01, "GPTQ damping: lambda = percdamp * mean(diag H), raised "
                             "automatically when Cholesky fails")
    blocksize: int = 128  # GPTQ / QuantEase lazy-batch width (results do not depend on it)
    act_order: bool = option(False, "GPTQ: columns by decreasing diag(H); QuantEase: sweeps in "
                             "that order")
    static_groups: bool = option(False, "GPTQ: every group's grid fitted up front on the "
                                 "original contiguous columns (else each when the sweep reaches "
                                 "it, on the updated weights; with act-order a group is then g "
                                 "consecutive columns of that order, which cannot be saved); "
                                 "QuantEase with act-order: contiguous groups")
    iters: int = option(30, "QuantEase coordinate-descent sweeps (the released code's default)")
    init: str = option("w", "QuantEase start: the weights, or a GPTQ result",
                       choices=["w", "gptq"])
    relaxed: bool = option(True, "QuantEase: round every sweep, so f never rises (default: the "
                           "released code's unrounded sweeps 1, 4, ..., 25)", flag="--rounded",
                           action="store_false")
    outliers: float = option(0.0, "QuantEase: fraction of weights kept in 16 bits (the "
                             "outlier-aware variant when > 0)")
    outlier_threshold: float = option(math.inf, "SpQR-style: relative error threshold for 16-bit "
                                      "weights (inf: SpQR's 0.2 for --method spqr)")
    stat_bits: int = 16  # bits per stored scale and zero; SpQR-style quantizes them to 3
    ratio: float = option(0.0035, "TaCQ: fraction of all linear weights kept in 16 bits (a "
                          "global top-k of the saliency score)")
    # ResQ: activations are quantized per token, the KV cache per token and head; 16 = not
    # quantized. The other methods quantize weights only (method_config sets 16 for them)
    abits: int = option(4, "ResQ: activation bits (the low slice); 16 for weight-only")
    kvbits: int = option(4, "ResQ: KV-cache bits (the low slice)")
    high_bits: int = option(8, "ResQ: bits of the high-variance slice (weights and activations)")
    high_fraction: float = option(0.125, "ResQ: fraction of channels in the high slice")
    rotation: str = option("pca", "ResQ: pca (ResQ), random (QuaRot-style), none (no rotation)",
                           choices=["pca", "random", "none"])
    w_rtn: bool = option(False, "ResQ: round the weights to nearest instead of GPTQ")

    def __post_init__(self):
        if not 2 <= self.wbits <= 8:
            raise ValueError(f"--wbits {self.wbits}: mixq quantizes to 2-8 bits")
        if self.groupsize != -1 and self.groupsize <= 0:
            raise ValueError(f"--groupsize {self.groupsize}: use a positive size or -1")
        checks = [("--percdamp", self.percdamp, self.percdamp >= 0, "a fraction >= 0"),
                  ("--iters", self.iters, self.iters >= 1, "at least 1 sweep"),
                  ("--init", self.init, self.init in ("w", "gptq"), "w or gptq"),
                  ("--outliers", self.outliers, 0 <= self.outliers <= 1, "a fraction in [0, 1]"),
                  ("--outlier-threshold", self.outlier_threshold, self.outlier_threshold >= 0,
                   "a relative error >= 0"),
                  ("--ratio", self.ratio, 0 <= self.ratio <= 1, "a fraction in [0, 1]"),
                  ("--abits", self.abits, 2 <= self.abits <= 16, "2-16 bits"),
                  ("--kvbits", self.kvbits, 2 <= self.kvbits <= 16, "2-16 bits"),
                  ("--high-bits", self.high_bits, 2 <= self.high_bits <= 16, "2-16 bits"),
                  ("--high-fraction", self.high_fraction, 0 <= self.high_fraction < 1,
                   "a fraction in [0, 1)"),
                  ("--rotation", self.rotation, self.rotation in ("pca", "random", "none"),
                   "pca, random or none")]
        for flag, value, ok, want in checks:
            if not ok:
                raise ValueError(f"{flag} {value}: want {want}")

    @property
    def maxq(self) -> int:
        return 2 ** self.wbits - 1


def round_up_fp16(s: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= s (s > 0), returned in s's dtype."""
    h = s.half()
    h = torch.where(h.to(s.dtype) < s, torch.nextafter(h, torch.full_like(h, math.inf)), h)
    return h.to(s.dtype)


def scale_zero(xmin, xmax, maxq: int, sym: bool, signed: bool = False):
    """Scale and zero point of the grid spanning [xmin, xmax] (tensors of the same shape).
    Symmetric grids store codes c in [0, maxq] with zero z = 2^(b-1), so c - z runs from
    -2^(b-1) to 2^(b-1) - 1. GPTQ's scale s = 2 max / maxq puts +max half a step past the top
    code (it is clipped to (1 - 1/maxq) max); the signed grid of QuaRot's and ResQ's code,
    s = max / (2^(b-1) - 1), represents +max exactly."""
    if sym:
        s = round_up_fp16(xmax / (maxq // 2) if signed else 2 * xmax / maxq)
        return s, torch.full_like(s, (maxq + 1) / 2)
    s = round_up_fp16((xmax - xmin) / maxq)
    return s, torch.round(-xmin / s)


def fake_quant(x, s, z, maxq: int):
    """Q(x) = s * (clamp(round(x/s + z), 0, maxq) - z): quantize, then dequantize."""
    return s * (quant_codes(x, s, z, maxq) - z)


def quant_codes(x, s, z, maxq: int):
    """The integer code of each x, in [0, maxq] (as a float tensor)."""
    return torch.clamp(torch.round(x / s + z), 0, maxq)


def fit_grid(w, bits: int, sym=False, mse=False, zero_in_range=True, signed=False):
    """Scale and zero of each row of w (m, k) -> s, z each (m, 1)."""
    maxq = 2 ** bits - 1
    xmin, xmax = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    if zero_in_range:
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = xmax == xmin  # an all-equal (e.g. all-zero) row gets a unit range
    xmin, xmax = torch.where(flat, xmin - 1, xmin), torch.where(flat, xmax + 1, xmax)
    if not mse:
        return scale_zero(xmin, xmax, maxq, sym, signed)
    return mse_grid(w, xmin, xmax, maxq, sym, signed)


# elements in one batch of the MSE search, by device. perf: a GPU wants few launches (80 rounds
# of small operations were most of GPTQ's time per block there); a CPU wants each pass to stay
# in cache (one range at a time runs fastest)
MSE_CHUNK = {"cuda": 2 ** 26, "cpu": 1}


def mse_grid(w, xmin, xmax, maxq: int, sym: bool, signed: bool):
    """fit_grid's MSE clipping: the grid of each row of w (m, k) over a shrunken range."""
    # shrink the range to [p xmin, p xmax], p = 1.00 ... 0.21, and keep per row the first p with
    # the smallest sum |Q(x) - x|^2.4 (the GPTQ repo's search: norm 2.4, grid 100, 80 steps).
    # c ranges at once, (c, m, k) with c m k <= MSE_CHUNK[device] (at least one range)
    ps = torch.tensor([1 - i / 100 for i in range(80)], dtype=w.dtype, device=w.device)
    chunk = max(1, MSE_CHUNK.get(w.device.type, 1) // w.numel())
    best = None
    for p in ps.split(chunk):
        p = p[:, None, None]  # (c, 1, 1)
        s1, z1 = scale_zero(p * xmin, p * xmax, maxq, sym, signed)  # (c, m, 1)
        # |Q(x) - x|^2.4 with Q = fake_quant's operations, in place on one buffer  (c, m, k)
        # perf: a temporary of the matrix's size per step cost more than the arithmetic
        e = (w / s1).add_(z1).round_().clamp_(0, maxq).sub_(z1).mul_(s1).sub_(w).abs_().pow_(2.4)
        err = e.sum(2, keepdim=True)  # (c, m, 1)
        err, i = err.min(0)  # the first p with the chunk's smallest error, per row  (m, 1)
        s1, z1 = s1.gather(0, i[None])[0], z1.gather(0, i[None])[0]
        if best is None:
            best, s, z = err, s1, z1
        else:  # a later chunk wins only if strictly better, as p goes down
            better = err < best
            best = torch.where(better, err, best)
            s, z = torch.where(better, s1, s), torch.where(better, z1, z)
    return s, z


def fill_masked(w, mask):
    """w with masked entries replaced by the mean of the row's unmasked entries, so a grid fitted
    on it ignores them (TaCQ and SpQR fit their statistics this way)."""
    if mask is None or not mask.any():
        return w
    keep = (~mask).to(w.dtype)
    mean = (w * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
    return torch.where(mask, mean, w)


def fit_group(w, cfg: QuantConfig, mask=None):
    """Grid of one group of columns w (m, g), ignoring masked weights; SpQR-style configs
    (stat_bits < 16) then quantize the statistics themselves (see quantize_stats)."""
    s, z = fit_grid(fill_masked(w, mask), cfg.wbits, cfg.sym, cfg.mse, signed=cfg.signed)
    if cfg.stat_bits < 16:
        # the zero stays an integer (rounding the second-level value costs no storage), so a
        # kept weight's code still dequantizes to exactly 0
        s = quantize_stats(s, cfg.stat_bits)
        z = quantize_stats(z, cfg.stat_bits).round().clamp(0, cfg.maxq)
    return s, z


def quantize_stats(v, bits: int, group: int = 16):
    """SpQR's second level (its bilevel statistics): a column of first-level statistics v (m, 1)
    is quantized to `bits` in groups of `group` rows, each group with its own 16-bit scale and
    zero."""
    m = v.shape[0]
    pad = (-m) % group
    x = torch.cat([v.flatten(), v.flatten()[-1:].expand(pad)]).view(-1, group)  # (m/16, 16)
    s, z = fit_grid(x, bits, zero_in_range=False)
    z = z.half().to(x.dtype)  # the second-level zero is stored in 16 bits too
    vq = fake_quant(x, s, z, 2 ** bits - 1).flatten()[:m].view_as(v)
    return vq.half().to(v.dtype)  # stored as fp16 in the checkpoint


def group_size(cfg: QuantConfig, n: int) -> int:
    """g for n input columns: column j is in group j // g, and where g does not divide n the
    last group is partial (n % g columns, as GPTQModel stores it: g128 on 576 inputs gives
    4 groups of 128 and one of 64)."""
    return n if cfg.groupsize == -1 else cfg.groupsize


def n_groups(n: int, g: int) -> int:
    return -(-n // g)  # ceil(n / g): the last group may be partial


def fit_groups(W, cfg: QuantConfig, mask=None):
    """The grid of every row and group of W (m, n), fitted once -> s, z each (m, ceil(n/g)),
    and g."""
    g = group_size(cfg, W.shape[1])
    stats = [fit_group(W[:, c:c + g], cfg, None if mask is None else mask[:, c:c + g])
             for c in range(0, W.shape[1], g)]
    return torch.cat([t[0] for t in stats], 1), torch.cat([t[1] for t in stats], 1), g


@dataclass
class Quantized:
    """A quantized weight: W_hat = s * (codes - z) + delta, where delta is nonzero only on `kept`
    (the weights stored in 16 bits) and holds the kept value minus the dequantized code."""
    codes: torch.Tensor  # (m, n) integers in [0, 2^bits)
    scales: torch.Tensor  # (m, ceil(n/g))
    zeros: torch.Tensor  # (m, ceil(n/g))
    bits: int
    groupsize: int  # g; n for one group per row
    kept: Optional[torch.Tensor] = None  # (m, n) bool
    delta: Optional[torch.Tensor] = None  # (m, n), fp16-representable, 0 off `kept`
    stat_bits: float = 16  # bits per stored scale or zero, second-level statistics included
    loss: float = float("nan")  # the method's own objective, for progress lines
    col_group: Optional[torch.Tensor] = None  # (n,) grid of each column, if not column // g
    col_bits: Optional[torch.Tensor] = None  # (n,) bits of each column, if not all `bits`
    damping: Optional[float] = None  # GPTQ: the percdamp it used (raised if Cholesky failed)

    def dequantize(self) -> torch.Tensor:
        n = self.codes.shape[1]
        idx = self.col_group if self.col_group is not None else \
            torch.arange(n, device=self.codes.device) // self.groupsize
        s, z = self.scales[:, idx], self.zeros[:, idx]  # (m, n): each column's grid
        w = s * (self.codes - z)
        return w if self.delta is None else w + self.delta

    def n_kept(self) -> int:
        return 0 if self.kept is None else int(self.kept.sum())


def per_column(stat, g: int, n: int):
    """A statistic per row and group (m, ceil(n/g)) -> one per weight (m, n)."""
    return stat.repeat_interleave(g, dim=1)[:, :n]


# -----------------------------------------------------------------------------
# 2. RTN


def rtn(W: torch.Tensor, cfg: QuantConfig) -> Quantized:
    """Round to nearest on the grid of each row (and group)."""
    W = as_work(W)
    s, z, g = fit_groups(W, cfg)  # (m, ceil(n/g)) each
    n = W.shape[1]
    codes = quant_codes(W, per_column(s, g, n), per_column(z, g, n), cfg.maxq)
    return Quantized(codes, s, z, cfg.wbits, g, stat_bits=bits_per_statistic(cfg))


def as_work(W):
    """Algorithms work in fp32 (fp64 if given fp64, for exactness tests)."""
    return W.to(torch.float64 if W.dtype == torch.float64 else torch.float32)


def bits_per_statistic(cfg: QuantConfig) -> float:
    """Bits per stored statistic: 16, or SpQR's b_stat + (16 + 16) / 16 with a second level."""
    return 16 if cfg.stat_bits >= 16 else cfg.stat_bits + 32 / 16


# -----------------------------------------------------------------------------
# 3. GPTQ (Frantar et al. 2022, arXiv 2210.17323), with 16-bit masks (TaCQ) and threshold
#    outliers (SpQR-style, Dettmers et al. 2023, arXiv 2306.03078)
#
# min over the grid of ||W X - Q X||^2 = tr((W - Q) H (W - Q)^T), H = 2 X X^T / N (the paper's
# eq. 1). Columns are quantized one at a time; the error of column i is spread onto the columns
# not yet quantized through U, the upper Cholesky factor of H^-1 (the paper's Algorithm 1):
#   e_i = (w_i - q_i) / U_ii,   W[:, j>i] -= e_i U_ij
# `gptq_paper` is exactly that loop. `gptq` gives the same result faster, with the paper's
# lazy batches (inside a block of B columns the updates are applied column by column, in
# gptq_block; the block's errors reach the later blocks in one matrix product), and adds
# act-order, static groups, 16-bit masks, SpQR's outliers and ResQ's two grids.


def gptq_paper(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """GPTQ as the paper's Algorithm 1 states it, one column at a time: W (m, n), H (n, n) ->
    the quantized weights Q (m, n). A group's grid is fitted when the loop reaches it, on the
    weights as the earlier columns' errors left them. (`gptq` below: the same Q, faster.)"""
    W, H = as_work(W).clone(), as_work(H).clone()
    n = W.shape[1]
    g = group_size(cfg, n)
    dead = torch.diag(H) == 0  # inputs never active in the calibration data: any value will do
    H[dead, dead] = 1
    W[:, dead] = 0
    U, _ = inverse_cholesky(H, cfg.percdamp)  # U^T U = (H + lambda I)^-1, U upper triangular
    Q = torch.zeros_like(W)
    for j in range(n):
        if j % g == 0:  # the grid of columns j .. j+g-1, on their current weights
            s, z = fit_group(W[:, j:j + g], cfg)  # (m, 1) each
        Q[:, j] = fake_quant(W[:, j], s[:, 0], z[:, 0], cfg.maxq)  # q_j = quant(w_j)
        e = (W[:, j] - Q[:, j]) / U[j, j]  # e_j = (w_j - q_j) / U_jj
        W[:, j:] -= e[:, None] * U[j, j:][None, :]  # w_k -= e_j U_jk for k >= j
    return Q


def inverse_cholesky(H, percdamp: float, retries: int = 6):
    """(U, the percdamp used): U^T U = (H + lambda I)^-1, lambda = percdamp * mean(diag H).
    When the Cholesky factorisation fails, raise the damping tenfold and retry, saying so."""
    lam = percdamp * torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    # on failure GPTQ's reference code stops, TaCQ's adds lambda again (up to 150 times); mixq
    # multiplies it by 10, at most `retries` times, and says so: a few tries reach any scale
    for attempt in range(retries + 1):
        try:
            L = torch.linalg.cholesky(H + lam * eye)
            Hinv = torch.cholesky_inverse(L)  # (H + lambda I)^-1
            mean = float(torch.mean(torch.diag(H)))
            return torch.linalg.cholesky(Hinv, upper=True), float(lam) / mean if mean else 0.0
        except torch.linalg.LinAlgError:
            if attempt == retries:
                raise RuntimeError("Cholesky of the Hessian failed even with damping "
                                   f"{float(lam):.3g}: raise --percdamp (e.g. 0.1) or --nsamples")
            new = lam * 10 if lam > 0 else 1e-6 * torch.mean(torch.diag(H)).clamp(min=1e-8)
            print(f"  Cholesky failed with damping {float(lam):.3g}; retrying with "
                  f"{float(new):.3g}")
            lam = new


def gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig,
         mask: Optional[torch.Tensor] = None, high: Optional[torch.Tensor] = None,
         block=None) -> Quantized:
    """GPTQ of W (m, n) against H (n, n).

    mask (m, n) bool: weights kept in 16 bits. The grid fit ignores them; at their column they
    keep their current (error-updated) value, so they inject no error but absorb the updates of
    earlier columns. With cfg.outlier_threshold < inf, a weight also joins the mask when its
    quantization error e^2 = ((w - q) / U_ii)^2 exceeds
    tau = threshold * mean_j Var(W[:, j]) / U_jj^2
    (SpQR's rule). high (n,) bool: ResQ's high-precision input columns, with their own per-row
    grid at cfg.high_bits (the others at cfg.wbits), both fitted once on the original W, in one
    GPTQ pass that takes the low columns first and the high ones last (ResQ moves o_proj's
    high columns, the last hd/8 of each head, to the end before its GPTQ). block: the column
    loop, gptq_block (default) or kernels.gptq_block (the same loop in one GPU launch per block
    of at most 128 columns, which refits no grid inside; the pipeline's `solve` picks it).
    Result.loss = ||E||^2 = tr((W - Q) H_damped (W - Q)^T)."""
    W, H = as_work(W).clone(), as_work(H).clone()
    m, n = W.shape
    g = group_size(cfg, n)
    mask = torch.zeros_like(W, dtype=torch.bool) if mask is None else mask.clone()
    # dead inputs (never active in the calibration data): any value is as good, use 0. The grids
    # are fitted after this, so a dead input's weights (which never reach the output) take no
    # part of any range; the reference codes fit per-channel grids before it
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    s_all, z_all, group, maxqs = initial_grids(W, cfg, g, mask, high)
    static = cfg.static_groups or high is not None  # else each group is fitted when reached
    if high is not None:  # ResQ: the low columns first, then the high ones, each in their order
        if cfg.act_order:
            raise ValueError("act_order: ResQ's GPTQ takes its low columns first, then the high")
        perm = torch.cat([torch.nonzero(~high).flatten(), torch.nonzero(high).flatten()])
    elif cfg.act_order:  # by decreasing diag H
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(n, device=W.device)
    W, H, mask = W[:, perm], H[perm][:, perm], mask[:, perm]
    # the grid of each column, in quantization order: a static group keeps its columns; a
    # dynamic one is the next g columns to quantize
    group = group[perm] if static else torch.arange(n, device=W.device) // g
    col_maxq = torch.tensor(maxqs, dtype=W.dtype, device=W.device)[group]
    U, damping = inverse_cholesky(H, cfg.percdamp)
    tau = math.inf
    if cfg.outlier_threshold < math.inf:
        tau = cfg.outlier_threshold * (W.var(dim=0) / torch.diag(U) ** 2).mean().item()
    codes = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    Err = torch.zeros_like(W)  # e_i = (w_i - q_i) / U_ii
    B = cfg.blocksize
    # a group refitted mid-block must end inside the block (the columns past it get this
    # block's updates only at its end); one of B, g dividing the other guarantees that
    if not static and g < n and g % B and B % g:
        B = math.gcd(B, g)
    block = block or gptq_block
    if block is not gptq_block:  # a kernel: blocks of <= 128 columns, no grid refit inside
        B = min(B, 128) if static else min(B, g, 128)
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        # the block in segments [a, b), each starting where a group's grid is refitted
        starts = [i1] + [i for i in range(i1 + 1, i2) if not static and i % g == 0]
        for a, b in zip(starts, starts[1:] + [i2]):
            if not static and a % g == 0:
                # fit the group's grid on its current weights, updated by every earlier column.
                # (The reference code reads them from the matrix that is updated only once per
                # block, so for g < B its grids miss this block's updates; mixq keeps the
                # up-to-date weights, the method as the paper states it.)
                k = a // g
                cur = torch.cat([W1[:, a - i1:], W[:, i2:i2 + g]], dim=1)[:, :g]  # g columns
                s_all[:, k:k + 1], z_all[:, k:k + 1] = fit_group(cur, cfg, mask[:, a:a + g])
            cols = group[a:b]
            codes[:, a:b], Q[:, a:b], Err[:, a:b], mask[:, a:b] = block(
                W1[:, a - i1:], U1[a - i1:, a - i1:], s_all[:, cols], z_all[:, cols],
                col_maxq[a:b], mask[:, a:b], tau)
        W[:, i2:] -= Err[:, i1:i2] @ U[i1:i2, i2:]  # the block's errors, onto later blocks
    inv = torch.argsort(perm)
    codes, Q, mask, group = codes[:, inv], Q[:, inv], mask[:, inv], group[inv]
    qz = Quantized(codes, s_all, z_all, cfg.wbits, g, stat_bits=bits_per_statistic(cfg),
                   loss=float((Err ** 2).sum()), damping=damping)
    if high is not None:
        qz.col_group = group
        qz.col_bits = torch.where(high, cfg.high_bits, cfg.wbits)
    elif cfg.act_order and not static and g < n:  # dynamic groups: not contiguous in W
        qz.col_group = group
    return with_kept(qz, Q, mask)


def initial_grids(W, cfg: QuantConfig, g: int, mask, high=None):
    """The grids GPTQ starts with -> s, z (m, grids), group (n,): the grid of each column, and
    each grid's top code. A grid per row and group, left at zero here and fitted on the current
    weights when the sweep reaches the group, or with cfg.static_groups fitted now on the
    original contiguous columns. ResQ (high given): two per-row grids, the low columns at wbits
    and the high columns at high_bits, fitted now."""
    m, n = W.shape
    if high is not None:
        if cfg.groupsize != -1:
            raise ValueError("ResQ's split grids are per channel: use --groupsize -1")
        lo = fit_group(W[:, ~high], cfg)
        hi = fit_grid(W[:, high], cfg.high_bits, cfg.sym, cfg.mse, signed=cfg.signed)
        s, z = torch.cat([lo[0], hi[0]], 1), torch.cat([lo[1], hi[1]], 1)  # (m, 2)
        return s, z, high.long(), [cfg.maxq, 2 ** cfg.high_bits - 1]
    s = torch.zeros(m, n_groups(n, g), dtype=W.dtype, device=W.device)
    z = torch.zeros_like(s)
    if cfg.static_groups:
        for c in range(0, n, g):
            s[:, c // g:c // g + 1], z[:, c // g:c // g + 1] = fit_group(W[:, c:c + g], cfg,
                                                                         mask[:, c:c + g])
    return s, z, torch.arange(n, device=W.device) // g, [cfg.maxq] * n_groups(n, g)


def gptq_block(W1, U1, s, z, maxq, mask, tau: float):
    """GPTQ's columns, in order, inside a block: W1 (m, w) the current weights of the block's
    columns from the first to quantize on (updated in place, all w of them), U1 (w, w) their
    part of U. The first c columns are quantized, c the width of s, z (m, c) and maxq (c,), their
    grids, and of mask (m, c), the weights kept in 16 bits; tau: SpQR's outlier threshold (inf:
    none). Returns codes, Q (the dequantized values), Err (the scaled errors) and the mask,
    each (m, c). (kernels.gptq_block is the same loop in one GPU launch, for c = w.)"""
    ncols = s.shape[1]
    mask = mask.clone()
    # perf: a column is a dozen small operations, so everything that does not depend on the
    # column's updated weights is done once per block, and a block without kept weights skips
    # the two selects
    zero_code = torch.round(z).clamp(min=0).minimum(maxq)  # (m, c): the code whose value is 0
    any_kept = tau < math.inf or bool(mask.any())
    codes, Q, Err = [], [], []  # per column (m,), stacked at the end
    for i in range(ncols):
        w, d = W1[:, i], U1[i, i]
        c = quant_codes(w, s[:, i], z[:, i], maxq[i])
        q = s[:, i] * (c - z[:, i])
        if any_kept:
            if tau < math.inf:  # SpQR-style: weights the grid serves too badly stay 16-bit
                mask[:, i] |= ((w - q) / d) ** 2 > tau
            mk = mask[:, i]
            # kept weights: the code whose value is 0 (so the stored correction is the weight)
            c = torch.where(mk, zero_code[:, i], c)
            q = torch.where(mk, w, q)
        err = (w - q) / d  # 0 at kept weights
        W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # spread the error on later columns
        codes.append(c), Q.append(q), Err.append(err)
    return torch.stack(codes, 1), torch.stack(Q, 1), torch.stack(Err, 1), mask


def with_kept(qz: Quantized, Q, mask) -> Quantized:
    """Attach the 16-bit weights: delta = fp16(Q) - dequantized code on the mask."""
    if mask is None or not mask.any():
        return qz
    base = qz.dequantize()
    qz.kept = mask
    # the correction is stored in fp16; base + delta is then exactly what a load gives back
    qz.delta = torch.where(mask, (Q - base).half().to(Q.dtype), torch.zeros_like(Q))
    return qz


def layer_loss(W, Q, H) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's output error on the calibration data."""
    D = as_work(W) - as_work(Q)
    return float(((D @ as_work(H)) * D).sum())


# -----------------------------------------------------------------------------
# 4. QuantEase (Behdin et al. 2023, arXiv 2309.01885)
#
# f(W_hat) = tr((W - W_hat) Sigma (W - W_hat)^T), Sigma = X X^T / N, on a grid fixed from the
# original W. For column j (all rows at once) f is a 1-D convex quadratic whose minimizer is
#   u_j = w_j + sum_{k != j} (w_k - w_hat_k) Sigma_kj / Sigma_jj
# and rounding u_j to the nearest grid point is the exact minimizer over the grid, so every
# rounded coordinate step can only lower f. No matrix is ever inverted (the paper's
# Algorithm 1). `quantease_paper` is that cyclic sweep as written; `quantease` gives the same
# result with the sums kept up to date a block of columns at a time (P, Phat, D below).
# (The released code sums Sigma = X X^T over the tokens; mixq averages. u_j, the rounding and
# the IHT step 1 / lambda_max do not depend on that scale: the same iterates.)


def rounds(it: int, cfg: QuantConfig) -> bool:
    """Whether sweep `it` (0-based) rounds. The released code's schedule (cfg.relaxed): sweeps
    1, 4, ..., 25 leave the columns at their unrounded minimizers u_j, the last always rounds."""
    return not (cfg.relaxed and it % 3 == 1 and it <= 25 and it < cfg.iters - 1)


def quantease_paper(W: torch.Tensor, Sigma: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """QuantEase's coordinate descent as the paper writes it: W (m, n), Sigma (n, n) -> W_hat
    (m, n) on the grid. cfg.iters cyclic sweeps over the columns, starting from W.
    (`quantease` below: the same W_hat, faster.)"""
    W, Sigma = as_work(W), as_work(Sigma)
    s, z, g = fit_groups(W, cfg)  # the grid, fitted once on the original W
    s, z = per_column(s, g, W.shape[1]), per_column(z, g, W.shape[1])  # (m, n) each
    d = torch.diag(Sigma).clone()
    d[d == 0] = 1  # a dead input (Sigma_jj = 0, so Sigma_kj = 0): u_j = w_j, simply rounded
    What = W.clone()
    for it in range(cfg.iters):
        for j in range(W.shape[1]):
            # u_j = w_j + sum_{k != j} (w_k - w_hat_k) Sigma_kj / Sigma_jj
            r = (W - What) @ Sigma[:, j] - (W[:, j] - What[:, j]) * Sigma[j, j]
            u = W[:, j] + r / d[j]
            What[:, j] = fake_quant(u, s[:, j], z[:, j], cfg.maxq) if rounds(it, cfg) else u
    return What


def cd_block(What, R, S_off, s, z, b1: int, b2: int, maxq: int, rounded: bool = True):
    """Columns b1..b2-1 of a sweep, in place on What (m, n). R = P - Phat on these columns, with
    Phat = sum_k What_k S_off_kj from before the block; D (m, b2 - b1) the changes made so far:
        u_j = R_j - sum_{b1 <= l < j} D_l S_off_lj     (Gauss-Seidel: this block's new values)
    Returns D. (kernels.cd_block is the same loop in one GPU launch.)"""
    D = torch.zeros_like(R)
    for j in range(b1, b2):
        i = j - b1
        u = R[:, i] - D[:, :i] @ S_off[b1:j, j]
        new = fake_quant(u, s[:, j], z[:, j], maxq) if rounded else u
        D[:, i] = new - What[:, j]
        What[:, j] = new
    return D


def cd_sweep(What, P, S_off, s, z, maxq: int, rounded: bool = True, blocksize: int = 128,
             block=None):
    """One cyclic sweep over the columns of What (m, n), in place, a block of columns at a time.
    P = T + T S_off (T the target, S_off = Sigma / diag(Sigma) off the diagonal, 0 on it), so
    u_j = P_j - sum_k What_k S_off_kj; s, z (m, n) the fixed grid. block: cd_block (default) or
    kernels.cd_block, the same loop as one GPU launch per block of <= 128 columns. Returns What."""
    n = What.shape[1]
    block = block or cd_block
    if block is not cd_block:
        blocksize = min(blocksize, 128)
    Phat = What @ S_off  # (m, n): sum_k What_k S_off_kj with the values at the sweep's start
    for b1 in range(0, n, blocksize):
        b2 = min(b1 + blocksize, n)
        D = block(What, P[:, b1:b2] - Phat[:, b1:b2], S_off, s, z, b1, b2, maxq, rounded)
        Phat[:, b2:] += D @ S_off[b1:b2, b2:]  # this block's changes, for the later columns
    return What


def normalized_offdiag(Sigma):
    """S_off = Sigma / diag(Sigma) per column (S_off[k, j] = Sigma_kj / Sigma_jj), zero diagonal.
    Dead columns (Sigma_jj = 0) have a zero column: they are simply rounded."""
    d = torch.diag(Sigma).clone()
    d[d == 0] = 1
    S_off = Sigma / d[None, :]
    S_off.fill_diagonal_(0)
    return S_off


def quantease(W: torch.Tensor, Sigma: torch.Tensor, cfg: QuantConfig,
              start: Optional[Quantized] = None, history: Optional[list] = None,
              block=None) -> Quantized:
    """QuantEase: cfg.iters cyclic CD sweeps on the grid fitted to W, starting from W itself, or
    from `start` (e.g. a GPTQ result), whose values and grid are then kept. With cfg.relaxed
    (the default, the released code's schedule) sweeps 1, 4, ..., 25 skip rounding and the last
    always rounds; without it every sweep rounds, f never rises, and the result is never worse
    than the start. cfg.act_order sweeps the columns by decreasing Sigma_jj; each group is then
    g consecutive columns of that order, as in the released code, or with cfg.static_groups g
    contiguous columns of W. history receives (rounded, f) after every sweep; block: cd_sweep's."""
    W, Sigma = as_work(W), as_work(Sigma)
    n = W.shape[1]
    col_group = None
    perm = torch.argsort(torch.diag(Sigma), descending=True) if cfg.act_order else None
    if start is None:
        # QuantEase's grid, fixed from the original W; with act-order and dynamic groups each
        # group is g consecutive columns of the sweep order
        dynamic = cfg.act_order and not cfg.static_groups and group_size(cfg, n) < n
        s, z, g = fit_groups(W[:, perm] if dynamic else W, cfg)
        if dynamic:
            col_group = torch.empty_like(perm)
            col_group[perm] = torch.arange(n, device=W.device) // g
        What = W.clone()
    else:
        s, z, g = as_work(start.scales), as_work(start.zeros), start.groupsize
        What = as_work(start.dequantize()).clone()
        col_group = start.col_group  # act-order GPTQ's dynamic groups
    idx = torch.arange(n, device=W.device) // g if col_group is None else col_group
    se, ze = s[:, idx], z[:, idx]  # (m, n): each weight's scale and zero
    if cfg.act_order:  # the same problem, its columns permuted (f is unchanged), swept in order
        W, Sigma, What, se, ze = (W[:, perm], Sigma[perm][:, perm], What[:, perm], se[:, perm],
                                  ze[:, perm])
    S_off = normalized_offdiag(Sigma)
    P = W + W @ S_off  # P_j = w_j + sum_{k != j} w_k Sigma_kj / Sigma_jj
    for it in range(cfg.iters):
        rounded = rounds(it, cfg)
        What = cd_sweep(What, P, S_off, se, ze, cfg.maxq, rounded, cfg.blocksize, block)
        if history is not None:
            history.append((rounded, layer_loss(W, What, Sigma)))
    loss = layer_loss(W, What, Sigma)
    if cfg.act_order:  # back to the columns' own order
        back = torch.argsort(perm)
        What, se, ze = What[:, back], se[:, back], ze[:, back]
    codes = quant_codes(What, se, ze, cfg.maxq)
    return Quantized(codes, s, z, cfg.wbits, g, stat_bits=bits_per_statistic(cfg), loss=loss,
                     col_group=col_group)


def top_k_mask(x, k: int):
    """Boolean mask of the k entries of largest |x| (ties broken by position)."""
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    if k > 0:
        mask[torch.topk(x.abs().flatten(), k).indices] = True
    return mask.view_as(x)


def largest_eigenvalue(A: torch.Tensor, tol: float = 1e-6, max_iters: int = 10_000) -> float:
    """lambda_max of a symmetric PSD matrix A (n, n) by power iteration: v <- A v / |A v|. The
    Rayleigh quotient v^T A v rises to lambda_max from below; stop when a step raises it by
    less than tol (relative). Matrix-vector products only, no decomposition (QuantEase's point;
    the released code uses LOBPCG). The start is random but fixed, so results repeat."""
    v = torch.randn(A.shape[0], 1, generator=torch.Generator().manual_seed(0), dtype=A.dtype)
    v = v.to(A.device) / v.norm()
    lam = 0.0
    for _ in range(max_iters):
        Av = A @ v
        new = float(v.T @ Av)  # the Rayleigh quotient of the current v
        if Av.norm() == 0 or new - lam <= tol * new:
            return max(new, lam)
        v, lam = Av / Av.norm(), new
    return lam


def quantease_outliers(W: torch.Tensor, Sigma: torch.Tensor, cfg: QuantConfig,
                       history: Optional[list] = None, block=None) -> Quantized:
    """Outlier-aware QuantEase (the paper's outlier-aware variant), from its objective:
        min  f(W_hat, Hs) = tr((W - W_hat - Hs) Sigma (W - W_hat - Hs)^T)
        over W_hat on the grid and Hs with at most k = round(outliers * m * n) nonzeros (16-bit).
    Alternate (a) one CD sweep on W_hat with target W - Hs, on QuantEase's schedule (rounds),
    and (b) one iterative hard thresholding step on Hs with step 1/(2L), L = 2 lambda_max(Sigma)
    the Lipschitz constant of the gradient 2 (W_hat + Hs - W) Sigma:
        Hs <- TopK(Hs - (W_hat + Hs - W) Sigma / (2 lambda_max))
    (the released code's step, alpha / lambda_max / 2 with alpha = 1, on a gradient without the
    factor 2). A rounded sweep and the IHT step (any step <= 1/L) never increase f. Start:
    Hs = the k largest |W|, W_hat = W without them; the grid is fitted ignoring those k weights.
    Written from the paper's objective and Algorithm 3, not from the released file, which writes
    each CD update into P_hat instead of W_hat (so it returns the dense part unquantized) and
    leaves Sigma_jj out of its Gauss-Seidel term."""
    if cfg.act_order:
        raise ValueError("act_order: outlier-aware QuantEase sweeps in column order only")
    W, Sigma = as_work(W), as_work(Sigma)
    m, n = W.shape
    k = int(round(cfg.outliers * m * n))
    Hs = W * top_k_mask(W, k)
    # the released code fits the grid on a robust range (each row without its n * outliers / 2
    # smallest and largest values); mixq fits it without the k initial outliers themselves,
    # the weights that Hs holds, as TaCQ and SpQR fit grids around their 16-bit weights
    s, z, g = fit_groups(W, cfg, mask=Hs != 0)
    se, ze = per_column(s, g, n), per_column(z, g, n)
    S_off = normalized_offdiag(Sigma)
    lam = max(largest_eigenvalue(Sigma), 1e-12)  # lambda_max(Sigma), for the step
    What = W - Hs
    for it in range(cfg.iters):
        T = W - Hs  # (a) the dense part fits what the outliers leave
        rounded = rounds(it, cfg)
        What = cd_sweep(What, T + T @ S_off, S_off, se, ze, cfg.maxq, rounded, cfg.blocksize,
                        block)
        if history is not None:
            history.append(("cd" if rounded else "cd-unrounded", layer_loss(W, What + Hs, Sigma)))
        Hs = Hs - (What + Hs - W) @ Sigma / (2 * lam)  # (b) a gradient step, then keep the top k
        Hs = Hs * top_k_mask(Hs, k)
        if history is not None:
            history.append(("iht", layer_loss(W, What + Hs, Sigma)))
    codes = quant_codes(What, se, ze, cfg.maxq)
    qz = Quantized(codes, s, z, cfg.wbits, g, stat_bits=bits_per_statistic(cfg))
    qz = with_kept(qz, qz.dequantize() + Hs, Hs != 0)
    qz.loss = layer_loss(W, qz.dequantize(), Sigma)
    return qz


# -----------------------------------------------------------------------------
# 5. Bit count: everything stored, for every method


def stored_bits(qz: Quantized) -> float:
    """codes (b each) + per (row, group) scale and zero (stat_bits each, 16 unless SpQR-style) +
    each weight kept in 16 bits (16-bit value + 16-bit column index, the SpQR/CSR convention)."""
    m, n = qz.codes.shape
    code_bits = m * (n * qz.bits if qz.col_bits is None else int(qz.col_bits.sum()))
    return code_bits + 2 * m * qz.scales.shape[1] * qz.stat_bits + 32 * qz.n_kept()


def average_bits(results: dict) -> float:
    """Average bits per weight over all quantized linears: sum of stored bits / sum of weights."""
    bits = sum(r["bits_stored"] for r in results.values())
    weights = sum(r["numel"] for r in results.values())
    return bits / weights


# -----------------------------------------------------------------------------
# 6. The layer-wise pipeline

SEQUENTIAL = [  # true-sequential groups: each is quantized after the ones before it
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
METHODS = ["rtn", "gptq", "quantease", "spqr", "tacq", "resq"]
LINEARS = [name for group in SEQUENTIAL for name in group]


class StopForward(Exception):
    """Raised by a hook once every linear of the current group has seen its input."""


# the fewest rows of Sigma per product in InputStats.add on the CPU (perf: see there)
GRAM_ROWS = 256


class InputStats:
    """Running Sigma = X X^T / N of one linear's inputs (fp32, on the block's device)."""

    def __init__(self, n: int, device):
        self.matrix = torch.zeros(n, n, device=device)  # Sigma (see add for the CPU's)
        self.count = 0
        self.mirrored = True  # the matrix is all of Sigma

    def add(self, x):
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, n)
        t, n = x.shape
        # running mean: Sigma <- Sigma * N / (N + t) + x^T x / (N + t)
        # perf: Sigma is symmetric. On the CPU only rows [a, b) from column a on are multiplied,
        # GRAM_ROWS at a time, the last block taking the rest (about 2/3 of the product, and in
        # cache), and the rest is mirrored when read. With blocks this large the CPU's BLAS sums
        # each entry as in x.T @ x, which it makes exactly symmetric: the same numbers
        # (tests/test_pipeline.py; a block of a few rows goes to other kernels, other last bits)
        rows = GRAM_ROWS if x.device.type == "cpu" else n
        starts = list(range(0, n - rows, rows)) or [0]
        for a, b in zip(starts, starts[1:] + [n]):
            self.matrix[a:b, a:].mul_(self.count / (self.count + t)).add_(
                x[:, a:b].T @ x[:, a:] / (self.count + t))
        self.count += t
        self.mirrored = len(starts) == 1

    @property
    def sigma(self) -> torch.Tensor:
        """Sigma (n, n); on the CPU the upper triangle copied onto the lower one first."""
        if not self.mirrored:
            i = torch.arange(self.matrix.shape[0], device=self.matrix.device)
            self.matrix = torch.where(i[:, None] > i[None, :], self.matrix.T, self.matrix)
            self.mirrored = True
        return self.matrix


# Where the pipeline decides how the math runs: `solve` picks the column loops for the device
# (on a GPU kernels.py's, one launch per block of columns), and `solve_group` the threads. On a
# CPU every solve runs on one torch thread, and the linears that read the same input (q/k/v,
# gate/up) are solved side by side on worker threads, as many as torch has threads. perf: a
# solver is thousands of small operations (a column at a time); spread over threads, each
# waits for all of them, and while another program holds a core that wait lasts a scheduler
# time slice: tens of times slower on a busy machine (docs/cpu.md). On a GPU the solves run
# one after another.


def use_triton(x: torch.Tensor) -> bool:
    """Whether x's device runs kernels.py's Triton loops (a GPU; never without kernels.py)."""
    return not isinstance(kernels, Missing) and kernels.use_triton(x)


def solve(method: str, W, sigma, cfg: QuantConfig, mask=None, high=None) -> Quantized:
    """One linear: dispatch to the algorithm. sigma = X X^T / N; GPTQ's H = 2 sigma; mask: the
    weights TaCQ keeps in 16 bits. On a GPU the column loops are kernels.py's (one launch per
    block of columns), elsewhere the torch loops: the same numbers."""
    gpu = use_triton(W)
    gb = kernels.gptq_block if gpu else gptq_block
    cb = kernels.cd_block if gpu else cd_block
    if method == "rtn":
        return rtn(W, cfg)
    if method in ("gptq", "tacq"):
        return gptq(W, 2 * sigma, cfg, mask=mask, block=gb)
    if method == "resq":  # --w-rtn: GPTQ with H = I and no damping is exactly RTN
        if cfg.w_rtn:
            return gptq(W, torch.eye(W.shape[1], device=W.device), replace(cfg, percdamp=0.0),
                        high=high, block=gb)
        return gptq(W, 2 * sigma, cfg, high=high, block=gb)
    if method == "spqr":  # spqr_config set the groups, threshold and stat bits
        return gptq(W, 2 * sigma, cfg, block=gb)
    if method == "quantease":
        if cfg.outliers > 0:
            return quantease_outliers(W, sigma, cfg, block=cb)
        start = gptq(W, 2 * sigma, cfg, block=gb) if cfg.init == "gptq" else None
        return quantease(W, sigma, cfg, start, block=cb)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@contextmanager
def one_thread():
    """torch's CPU operations on one thread inside, on every Python thread (torch's thread count
    is the process's); the count restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def solve_group(problems: list, device) -> list:
    """(solve(*p), seconds) for each problem p (solve's arguments) of linears that share an
    input: on a CPU side by side on worker threads, torch on one thread (its thread count is
    the process's); on a GPU one after another."""
    def timed(p):
        t0 = time.perf_counter()
        qz = solve(*p)
        return qz, time.perf_counter() - t0
    if torch.device(device).type != "cpu":
        return [timed(p) for p in problems]
    workers = min(len(problems), torch.get_num_threads())
    with one_thread(), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(timed, problems))


def spqr_config(cfg: QuantConfig) -> QuantConfig:
    """SpQR-style defaults where the user kept the generic ones: groups of 16, 3-bit statistics
    with a 16-bit second level, outlier threshold 0.2, act-order (static groups)."""
    return replace(cfg, groupsize=16 if cfg.groupsize == -1 else cfg.groupsize,
                   stat_bits=3 if cfg.stat_bits == 16 else cfg.stat_bits,
                   outlier_threshold=0.2 if cfg.outlier_threshold == math.inf
                   else cfg.outlier_threshold, act_order=True, static_groups=True)


def calibration_windows(spec: str, tok, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) token windows at random offsets in the calibration text: for pydoc the
    calibration split (never the evaluation split), for wikitext2:DIR the train file."""
    tokens = metrics.corpus_tokens(spec, tok, "calib")
    if len(tokens) <= seqlen:
        raise ValueError(f"calibration text {spec} has {len(tokens)} tokens; need > {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seqlen, (nsamples,), generator=g)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def calibration_data(spec: str, tok, nsamples: int, seqlen: int, seed: int,
                     answer_loss: bool = False):
    """(samples, answer masks or None). Corpora: random windows (calibration_windows). Tasks, as
    TaCQ's released code: one item ("prompt answer") per sample, in a seeded order, cut at
    seqlen tokens (the released code does not cut; the cut keeps a sample within the memory
    that --seqlen sets; the bundled tasks' longest item, in arith, has 51 tokens), until the
    samples hold nsamples * seqlen tokens (or the items run out); the loss then covers every
    position. With answer_loss (mixq's own protocol): the items joined
    by blank lines and cut into consecutive windows of seqlen, fewer than nsamples if the items
    run out, with masks of the answer tokens, the only ones the loss scores."""
    if not metrics.is_task(spec):
        return calibration_windows(spec, tok, nsamples, seqlen, seed), None
    task = metrics.load_task(spec, "calib")
    items = list(task.items)
    random.Random(seed).shuffle(items)
    if not answer_loss:
        samples, budget = [], nsamples * seqlen
        for item in items:
            ids = torch.tensor(tok.encode("".join(metrics.calibration_text(task, item))))[:seqlen]
            if len(ids) < 2:  # nothing to predict
                continue
            if samples and len(ids) > budget:
                break
            samples.append(ids)
            budget -= len(ids)
        if not samples:
            raise ValueError("no item has two tokens to predict")
        return samples, None
    ids, answer = [], []
    for item in items:
        context, ans = metrics.calibration_text(task, item)
        a, b = tok.encode(context), tok.encode(context + ans + "\n\n")
        n_ans = len(tok.encode(context + ans)) - len(a)
        ids += b
        answer += [False] * len(a) + [True] * n_ans + [False] * (len(b) - len(a) - n_ans)
    ids, answer = torch.tensor(ids), torch.tensor(answer)
    n = max(1, min(nsamples, len(ids) // seqlen))
    L = min(seqlen, len(ids))
    return [ids[i * L:(i + 1) * L] for i in range(n)], [answer[i * L:(i + 1) * L] for i in range(n)]


@torch.no_grad()
def quantize_model(model: llama.Transformer, calib: Optional[torch.Tensor], method: str,
                   cfg: QuantConfig, device=None, log=print, masks: Optional[dict] = None,
                   resume: Optional[str] = None, fingerprint: Optional[dict] = None) -> dict:
    """Quantize every linear of every block, in place (the weights become W_hat), one block on
    `device` at a time. calib: token sequences (a (nsamples, seqlen) tensor or a list of 1-D
    tensors of any lengths), None for RTN; masks: per linear name, the weights to keep in 16 bits
    (TaCQ). resume: a directory where each finished block is saved with `fingerprint`; a later
    call with the same directory and fingerprint continues after the last finished block.
    Returns, per linear name, the packed tensors for saving plus its stored bits and loss."""
    cfg = method_config(method, cfg)  # e.g. SpQR-style's groups of 16 (idempotent)
    device = torch.device(device or model.device)
    home = model.device
    done = resume_state(resume, fingerprint) if resume else 0
    results = {}
    xs = store = rope = None  # RTN needs no data
    if method != "rtn":
        xs, store, rope = block_inputs(model, calib, device)
    t_start = time.perf_counter()
    for li, block in enumerate(model.layers):
        t0 = time.perf_counter()
        block.to(device)
        outputs = None
        if li < done:  # finished by an earlier run: weights and results from its state
            block_results = load_block(resume, li, block)
        else:
            block_results, outputs = quantize_block(model, li, xs, rope, method, cfg, device,
                                                    store, masks, li + 1 < len(model.layers))
        if xs is not None and li + 1 < len(model.layers):  # its outputs feed the next block
            xs = outputs or [store(block(x.to(device, non_blocking=True), *rope(x))) for x in xs]
        block.to(home)
        dt = time.perf_counter() - t0
        if li >= done:  # the block's record (saved with --resume, listed in --json)
            for r in block_results.values():
                r |= {"block_seconds": dt, "peak_memory_gb": peak_memory_gb(device)}
            if resume:
                save_block(resume, li, block, block_results, fingerprint)
        results |= block_results
        eta = (time.perf_counter() - t_start) / (li + 1 - min(done, li)) * (
            len(model.layers) - li - 1)
        errs = " ".join(f"{k.rsplit('.', 1)[1]} {r['rel_err']:.2e}"
                        for k, r in block_results.items())
        log(f"{clock()} block {li + 1:2d}/{len(model.layers)}  rel err {errs}  {dt:5.1f}s  "
            f"ETA {eta:5.0f}s"
            + ("  (resumed)" if li < done else ""))
    return results


def clock() -> str:
    """The time of day, at the start of progress lines (a long run's log then shows when)."""
    return time.strftime("%H:%M:%S")


def block_records(results: dict) -> list:
    """One record per block from its linears' results: seconds, peak memory, and per linear
    the relative output error, the damping GPTQ used, the solver's seconds, the kept weights."""
    blocks = {}
    for name, r in results.items():
        li = int(name.split(".")[1])
        b = blocks.setdefault(li, {"block": li, "seconds": r.get("block_seconds"),
                                   "peak_memory_gb": r.get("peak_memory_gb"), "linears": {}})
        b["linears"][name.split(".", 2)[2]] = {k: r.get(k) for k in
                                               ("rel_err", "damping", "solve_seconds", "kept")}
    return [blocks[i] for i in sorted(blocks)]


def activation_store(xs: list, device, copies: float = 2):
    """Where the calibration activations wait between blocks -> a function that puts one there.
    On a GPU: on the GPU itself when `copies` times the size of xs (a block's inputs, its outputs,
    what quantize_block replays) fits in a quarter of its free memory, else in pinned host
    memory. On a CPU: as they are."""
    # perf: 128 x 2048 tokens of Llama-3-8B in bf16 are 2 GiB per copy; pinned memory copies at
    # full PCIe speed, not through a pageable bounce buffer
    device = torch.device(device)
    if device.type != "cuda":
        return lambda x: x.cpu()
    nbytes = sum(x.numel() * x.element_size() for x in xs)
    if copies * nbytes <= torch.cuda.mem_get_info(device)[0] / 4:
        return lambda x: x.to(device)

    def pinned(x):
        return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x)
    return pinned


def block_inputs(model: llama.Transformer, calib, device):
    """The inputs of block 0 (the embeddings of each calibration window, (1, T, dim) each) where
    activations wait between blocks (activation_store), the function that puts a block's outputs
    there, and rope(x) -> (cos, sin) on `device` for x's length (cached; lengths may differ)."""
    xs = [model.embed_tokens(c[None].to(model.device)) for c in calib]
    # the inputs and outputs, o_proj's and down_proj's inputs, the attention's and MLP's outputs
    store = activation_store(xs, device, copies=5 + model.args.hidden_dim / model.args.dim)
    ropes = {}

    def rope(x):
        T = x.shape[1]
        if T not in ropes:
            ropes[T] = tuple(t.to(device) for t in model.rope(0, T))
        return ropes[T]
    return [store(x) for x in xs], store, rope


# a sub-module of the block whose last linear is this one: once that linear is quantized, the
# sub-module's output on each calibration input is final and later passes replay it
OUTPUT_LINEARS = {"self_attn.o_proj": "self_attn", "mlp.down_proj": "mlp"}


class Replay(torch.nn.Module):
    """Stands in for a sub-module during a pass over the calibration inputs: its i-th call
    returns outputs[i], the sub-module's output on the i-th input, computed once before."""

    def __init__(self, outputs: list, device):
        super().__init__()
        self.outputs, self.device, self.calls = outputs, device, 0

    def forward(self, *args):
        self.calls += 1
        return self.outputs[self.calls - 1].to(self.device, non_blocking=True)


@contextmanager
def replaying(block, outputs: dict, device):
    """Within the block, the sub-modules named in outputs replaced by their Replay."""
    saved = {name: getattr(block, name) for name in outputs}
    try:
        for name, outs in outputs.items():
            setattr(block, name, Replay(outs, device))
        yield
    finally:
        for name, module in saved.items():
            setattr(block, name, module)


def quantize_block(model, li: int, xs, rope, method: str, cfg: QuantConfig, device, store=None,
                   masks=None, want_outputs=True):
    """The linears of block li, group by group (true sequential), in place -> the results per
    linear and the block's outputs on the calibration inputs xs (None without xs or when not
    wanted, e.g. for the last block).
    Each group's inputs come from one pass over xs; the attention's and the MLP's outputs,
    final once o_proj and down_proj are quantized, are replayed in the later passes instead of
    recomputed (the same tensors, so the same numbers)."""
    # perf: without the replays the attention ran four times per block and the MLP twice
    block = model.layers[li]
    results, outputs = {}, {}  # outputs: sub-module name -> its output on each input
    for group in SEQUENTIAL:
        keep = [name for name in group if name in OUTPUT_LINEARS]
        stats, inputs = {}, {}
        if xs:
            with replaying(block, outputs, device):
                stats, inputs = collect_input_stats(block, group, xs, rope, device, keep, store)
        for name, st in stats.items():
            if not torch.isfinite(st.sigma).all():
                raise ValueError(f"layers.{li}.{name}: its calibration inputs hold NaN or Inf. "
                                 "That comes from the data or the model (activations that "
                                 "overflow, e.g. in fp16), not from the damping")
        problems = []
        for name in group:
            mask = None if masks is None else masks[f"layers.{li}.{name}"].to(device)
            high = resq_high_columns(name, model.args, cfg) if method == "resq" else None
            problems.append((method, block.get_submodule(name).weight.data.to(device),
                             stats[name].sigma if stats else None, cfg, mask,
                             None if high is None else high.to(device)))
        for name, (qz, solve_seconds) in zip(group, solve_group(problems, device)):
            lin = block.get_submodule(name)
            W = lin.weight.data
            W_hat = qz.dequantize()
            # relative output error on the calibration data (weight error for RTN)
            sigma = stats[name].sigma if stats else torch.eye(W.shape[1], device=W.device)
            rel = layer_loss(W, W_hat, sigma) / max(layer_loss(W, 0 * W, sigma), 1e-30)
            lin.weight.data = W_hat.to(W.dtype)
            if method == "resq":
                try:
                    tensors = resq_tensors(qz, name, model.args, cfg)
                except ValueError:  # widths that do not pack (check_resq_saveable says which)
                    tensors = None
            else:
                tensors = packed_tensors(qz) if qz.bits in PACKED_BITS and \
                    qz.col_group is None else None
            results[f"layers.{li}.{name}"] = {
                "tensors": tensors,
                "bits": qz.bits, "groupsize": qz.groupsize, "bits_stored": stored_bits(qz),
                "numel": W.numel(), "kept": qz.n_kept(), "rel_err": rel,
                "solve_seconds": solve_seconds, "damping": qz.damping}
        for name in list(inputs):  # the sub-module's output: its last linear on its inputs
            lin = block.get_submodule(name)
            # forward, not __call__: the kept inputs are past the linear's pre-hooks already
            assert not lin._forward_hooks, f"{name} has forward hooks that a replay would skip"
            outputs[OUTPUT_LINEARS[name]] = [store(lin.forward(x.to(device, non_blocking=True)))
                                             for x in inputs.pop(name)]
    if not xs or not want_outputs:
        return results, None
    with replaying(block, outputs, device):
        return results, [store(block(x.to(device, non_blocking=True), *rope(x))) for x in xs]


# -- resume: every finished block on disk, with a fingerprint of what produced it --------------


def differing_keys(saved: dict, now: dict) -> str:
    """The settings on which two fingerprints disagree, with both values where they are short;
    inside the JSON-encoded options and model config, each option."""
    def unpack(fp):  # {"options": '{"wbits": 3, ...}'} -> {"options.wbits": 3, ...}
        out = {}
        for key, v in fp.items():
            inner = json.loads(v) if isinstance(v, str) and v.startswith("{") else None
            out |= {f"{key}.{k}": x for k, x in inner.items()} if inner else {key: v}
        return out
    a, b = unpack(saved), unpack(now)
    short = lambda v: repr(v) if len(repr(v)) <= 40 else "..."  # noqa: E731
    return "; ".join(f"{k}: {short(a.get(k))} there, {short(b.get(k))} now"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def saved_state(path: Path, fingerprint: dict, flag: str, what: str) -> Optional[dict]:
    """The JSON an earlier run left at path (None if there is none), with the fingerprint of
    what produced it; one with another fingerprint is refused, naming the settings."""
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    if state.get("fingerprint") != fingerprint:
        raise ValueError(f"{flag} {path.parent} holds {what} other settings (differs in: "
                         f"{differing_keys(state.get('fingerprint') or {}, fingerprint)}); use "
                         "another directory")
    return state


def check_resume_dir(resume):
    """--resume takes a new or empty directory, or one that holds only an earlier run's files
    (state.json, block-NNNN.safetensors and their temp names): mixq mixes nothing into a
    directory of the user's."""
    d = Path(resume)
    if d.exists() and not d.is_dir():
        raise ValueError(f"--resume {resume} is a file: give a directory")
    ours = re.compile(r"state\.json|\.state\.json\.tmp-\d+|\.?block-\d{4}(\.safetensors|\.tmp)")
    others = sorted(p.name for p in d.iterdir() if not ours.fullmatch(p.name)) if d.is_dir() else []
    if others:
        raise ValueError(f"--resume {resume} holds files that are not an earlier run's "
                         f"({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}): give a "
                         "new or empty directory")


def resume_state(resume: str, fingerprint: dict) -> int:
    """How many blocks an earlier run with the same fingerprint finished (0 for a new dir)."""
    state = saved_state(Path(resume) / "state.json", fingerprint, "--resume", "a run with")
    return 0 if state is None else state["blocks_done"]


def save_block(resume: str, li: int, block, block_results: dict, fingerprint: dict):
    """Block li's quantized weights and results, then state.json; each file written to a temp
    name and renamed, so a kill at any moment leaves the last complete state."""
    from safetensors.torch import save_file
    d = Path(resume)
    d.mkdir(parents=True, exist_ok=True)
    tensors, meta = {}, {}
    for name, r in block_results.items():
        short = name.split(".", 2)[2]  # self_attn.q_proj
        tensors[f"{short}.weight"] = block.get_submodule(short).weight.data.contiguous().cpu()
        for k, v in (r["tensors"] or {}).items():
            tensors[f"{short}.{k}"] = v
        meta[name] = {k: v for k, v in r.items() if k != "tensors"}
    tmp = d / f".block-{li:04d}.tmp"
    save_file(tensors, str(tmp), metadata={"results": json.dumps(meta)})
    llama.with_umask(tmp)
    os.replace(tmp, d / f"block-{li:04d}.safetensors")
    metrics.write_json(d / "state.json", {"fingerprint": fingerprint, "blocks_done": li + 1})


def load_block(resume: str, li: int, block) -> dict:
    """Put block li's saved weights back and return its results."""
    from safetensors import safe_open
    with safe_open(str(Path(resume) / f"block-{li:04d}.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["results"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    results = {}
    for name, r in meta.items():
        short = name.split(".", 2)[2]
        lin = block.get_submodule(short)
        lin.weight.data = tensors[f"{short}.weight"].to(lin.weight.device)
        packed = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                  if k.startswith(short + ".") and not k.endswith(".weight")}
        results[name] = r | {"tensors": packed or None}
    return results


def collect_input_stats(block, group, xs, rope, device, keep=(), store=None):
    """Run the block on every calibration input with hooks that accumulate Sigma for the linears
    of `group`, stopping each forward as soon as all of them have seen their input (before the
    last one multiplies: its output is not needed). Linears fed the very same tensor (q, k, v;
    gate, up) share one Sigma: computed once, not three times. -> (stats, inputs): inputs[name]
    for the names in `keep`, each linear's input on every calibration input (through store)."""
    stats, seen, hooks = {}, {}, []  # seen: name -> its input in the current forward
    inputs = {name: [] for name in keep}
    for name in group:
        lin = block.get_submodule(name)
        stats[name] = InputStats(lin.in_features, device)

        def hook(mod, inp, name=name):  # before the linear's forward
            x = inp[0]
            if name in inputs:
                inputs[name].append(store(x))
            same_input = next((o for o, t in seen.items() if t is x), None)
            if same_input is None:
                stats[name].add(x)
            else:  # the same input as an earlier linear of the group: the same Sigma
                stats[name] = stats[same_input]
            seen[name] = x
            if len(seen) == len(group):
                raise StopForward
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        for name in group:
            # perf: nothing reads a group member's output before the pass stops at the last one
            # (q and k before v's hook, gate before up's), so its product is skipped: an empty
            # tensor of the output's shape stands in (a quarter of the passes' linear FLOPs)
            lin = block.get_submodule(name)
            lin.forward = lambda x, n=lin.out_features: x.new_empty(*x.shape[:-1], n)
        for x in xs:
            seen.clear()
            try:
                block(x.to(device, non_blocking=True), *rope(x))
            except StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
        for name in group:
            block.get_submodule(name).__dict__.pop("forward", None)  # the class's forward again
    return stats, inputs


# -----------------------------------------------------------------------------
# 7. TaCQ (Xiao et al. 2025, arXiv 2504.07389)
#
# Keep in 16 bits the weights whose quantization would hurt the task most, scored by
#   S = |W| * |W - Q_ref(W)| * sum_s |dL_s/dW|        (Q_ref: plain GPTQ, same bits and data)
# with one global top-k over every q/k/v/o/gate/up/down matrix, then GPTQ with that mask.
# `tacq` runs the steps in order. The paper versions of its two non-obvious parts come first:
# the gradient sum by plain autograd and the top-k by one sort; the versions `tacq` runs give
# the same numbers with the memory of an 8B model in mind.


def gradient_magnitudes_paper(model: llama.Transformer, calib, answers=None) -> dict:
    """G[name] = sum over samples s of |dL_s/dW| for every linear, by autograd on the whole
    model, one sample at a time (batch size 1): the definition. (`gradient_magnitudes`: the
    same G, one block in memory at a time.)"""
    names = linear_names(model)
    weights = [model.get_submodule(name).weight for name in names]
    G = {name: torch.zeros(w.shape, device=w.device) for name, w in zip(names, weights)}
    for i, tokens in enumerate(calib):
        tokens = tokens.to(model.device)
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            logits = model(tokens[None])  # (1, T, vocab)
            loss = next_token_loss(logits, tokens, None if answers is None else answers[i])
            grads = torch.autograd.grad(loss, weights)
        for name, g in zip(names, grads):
            G[name] += g.abs().float()  # |dL_s/dW| of this sample, added to the sum
    for w in weights:
        w.requires_grad_(False)
    return G


def global_top_k_paper(scores: dict, ratio: float) -> dict:
    """Masks of the k = int(ratio * N) highest scores over all matrices together (N their total
    size): one stable descending sort of every score; ties go to the first matrix, then the
    first index. (`global_top_k_masks`: the same masks without sorting N numbers.)"""
    flat = torch.cat([s.flatten().float().cpu() for s in scores.values()])  # (N,)
    k = int(ratio * flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


def tacq(model: llama.Transformer, calib, answers, cfg: QuantConfig, device=None, log=print,
         scores: Optional[dict] = None, **pipeline):
    """TaCQ on a model, in place, step by step -> (results of the final GPTQ, masks):
      1. G = sum_s |dL_s/dW| on the fp model                   gradient_magnitudes
      2. Q_ref(W): plain GPTQ of every linear (same bits, data) quantize_model(..., "gptq")
      3. S = |W| * |W - Q_ref(W)| * G, on the fp weights       tacq_score
      4. the k = ratio * N highest S over all linears          global_top_k_masks
      5. GPTQ again, those weights kept in 16 bits             quantize_model(..., masks)
    Steps 1-3 are `tacq_scores`; `scores` skips them (the scores do not depend on the ratio:
    the CLI keeps them in --scores). answers: per sample, the answer tokens the loss scores
    (--answer-loss), or None for every position. pipeline: options of the final
    quantize_model (the CLI's resume)."""
    if scores is None:
        scores = tacq_scores(model, calib, answers, cfg, device, log)  # steps 1-3
    masks = global_top_k_masks(scores, cfg.ratio)  # step 4
    del scores
    log(f"TaCQ: keeping {sum(int(m.sum()) for m in masks.values()):,} weights in 16 bits "
        f"(ratio {cfg.ratio}):")
    print_circuit(circuit_location(masks), log)
    log("final GPTQ with that mask:")
    results = quantize_model(model, calib, "tacq", cfg, device, log, masks=masks,
                             **pipeline)  # step 5
    return results, masks


def linear_names(model: llama.Transformer) -> list:
    """Every quantized linear: layers.{i}.self_attn.q_proj ... layers.{i}.mlp.down_proj."""
    return [f"layers.{i}.{n}" for i in range(len(model.layers)) for n in LINEARS]


def next_token_loss(logits, tokens, answer=None):
    """Mean cross-entropy of each next token, over all positions (as TaCQ's released code).
    With `answer` (task data under --answer-loss) only over the answer tokens: mixq's option,
    not the released code's, so that the task gradients are about the answers alone."""
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[1:], reduction="none")
    if answer is None:
        return nll.mean()
    target = answer[1:].to(nll.device)  # position t predicts token t+1
    return (nll * target).sum() / target.sum().clamp(min=1)


def gradient_magnitudes(model: llama.Transformer, calib, answers=None, loss_scale: float = 1.0,
                        log=print, keep_graphs: Optional[bool] = None) -> dict:
    """G[name] = sum over samples s of |dL_s/dW| for every linear of every block (fp32, batch
    size 1), by backpropagation written out one block at a time (gradient checkpointing per
    block): a forward pass without a graph keeps each block's input; the head gives dL/dh at the
    top; then, from the last block down, an fp32 copy of the block is run again on its input
    with autograd, which gives the block's weight gradients (added into G at once) and dL/d(its
    input) for the block below. Memory: the model + G + one sample's block inputs + one block in
    fp32 and its activations; a bf16 model still gets fp32 gradients. (For a bf16 model, the
    default on a GPU, each block's input then comes from the bf16 forward, where TaCQ's code
    runs the whole model in fp32; bf16 halves the model beside G, 16 instead of 32 GB at 8B
    next to G's 28 GB. --dtype fp32 gives the released code's arithmetic.)
    keep_graphs (default: for an fp32 model on the CPU): the forward runs the model's own fp32
    blocks with autograd and keeps each block's graph until the backward, so a block runs once
    per sample instead of twice; the same G (the same fp32 operations on the same inputs), for
    the memory of every block's activations of one sample.
    (scripts/tacq_pipeline.py runs the same steps with the blocks split over several GPUs.)"""
    fp32 = model.embed_tokens.weight.dtype == torch.float32
    if keep_graphs is None:
        keep_graphs = fp32 and model.device.type == "cpu"
    if keep_graphs and not fp32:
        raise ValueError("keep_graphs runs the model's own blocks with autograd: it needs an fp32 "
                         "model (the gradients are taken in fp32)")
    G = {name: torch.zeros(model.get_submodule(name).weight.shape, device=model.device)
         for name in linear_names(model)}
    head = fp32_head(model)
    weights = [[block.get_submodule(n).weight for n in LINEARS] for block in model.layers]
    grad_was = {w: w.requires_grad for ws in weights for w in ws}  # restored at the end
    t0 = time.perf_counter()
    try:
        for w in grad_was:
            w.requires_grad_(keep_graphs)
        for i, tokens in enumerate(calib):
            tokens = tokens.to(model.device)
            cos, sin = model.rope(0, len(tokens))  # fp32
            with torch.no_grad():
                h = model.embed_tokens(tokens[None])  # (1, T, dim)
            saved = []  # per block: its input h_l, or (h_l, its output with its graph)
            for block in model.layers:
                if keep_graphs:  # the backward will start from this graph
                    x = h.detach().requires_grad_(True)
                    with torch.enable_grad():
                        h = block(x, cos, sin)
                    saved.append((x, h))
                else:  # the backward will run the block again, in fp32
                    saved.append(h)
                    with torch.no_grad():
                        h = block(h, cos, sin)  # exactly as model.forward runs it
            dh = head_gradient(head, h.detach(), tokens,
                               None if answers is None else answers[i], loss_scale)
            for li in reversed(range(len(model.layers))):  # dL/dh_{l+1} -> weight grads, dL/dh_l
                if keep_graphs:
                    x, out = saved.pop()
                    dh = weight_gradients(out, x, weights[li], dh, G, li)
                else:
                    dh = block_gradients(model.layers[li], saved.pop(), cos, sin, dh, G, li)
            if (i + 1) % max(1, len(calib) // 4) == 0:
                log(f"{clock()}   gradients: {i + 1}/{len(calib)} samples, "
                    f"{time.perf_counter() - t0:.0f}s")
    finally:
        for w, was in grad_was.items():
            w.requires_grad_(was)
    return G


def fp32_head(model: llama.Transformer) -> torch.nn.ModuleDict:
    """The final norm and lm_head, copied once in fp32."""
    head = torch.nn.ModuleDict({"norm": model.norm, "lm_head": model.lm_head})
    return copy.deepcopy(head).float()


def head_gradient(head, h, tokens, answer=None, loss_scale: float = 1.0):
    """dL/dh for the last block's output h (1, T, dim), through the fp32 head."""
    h = h.float().requires_grad_(True)
    with torch.enable_grad():
        loss = next_token_loss(head["lm_head"](head["norm"](h)), tokens, answer)
        (dh,) = torch.autograd.grad(loss * loss_scale, h)
    return dh


def block_gradients(block, x, cos, sin, dh, G: dict, li: int):
    """One block's step of the backward pass: recompute the block in fp32 on its input x with
    autograd, add |dL/dW| of its linears into G["layers.{li}...."], return dL/dx."""
    block = copy.deepcopy(block).float()
    ws = [block.get_submodule(n).weight.requires_grad_(True) for n in LINEARS]
    x = x.float().requires_grad_(True)
    with torch.enable_grad():
        out = block(x, cos, sin)
    return weight_gradients(out, x, ws, dh, G, li)


def weight_gradients(out, x, ws: list, dh, G: dict, li: int):
    """Backpropagate dh = dL/d(out) through the graph of block li's output `out` on its input
    x: add |dL/dW| for its linears' weights ws (in LINEARS order) into G, return dL/dx."""
    dx, *dws = torch.autograd.grad(out, [x, *ws], grad_outputs=dh)
    for n, dw in zip(LINEARS, dws):
        dw = dw.abs()  # |dL_s/dW|: per sample, then the sum
        if not torch.isfinite(dw.amax()):  # perf: amax carries any NaN or Inf, in one pass
            raise ValueError(f"layers.{li}.{n}: its loss gradient holds NaN or Inf. That comes "
                             "from the data or the model (activations that overflow)")
        G[f"layers.{li}.{n}"] += dw
    return dx


def tacq_score(W, W_ref, G):
    """S = |W| * |W - Q_ref(W)| * G: zero where W = 0, where quantization does not move W, or
    where the task loss is insensitive to W."""
    # the released code multiplies fp16 copies of W and Q_ref(W); mixq takes the product in
    # fp32, so that close scores are not tied by fp16 rounding before the global top-k
    W, W_ref = W.float(), W_ref.float()
    return W.abs() * (W - W_ref).abs() * G.float()


def global_top_k_masks(scores: dict, ratio: float) -> dict:
    """Masks of the k = int(ratio * N) highest scores over all matrices together (N = their total
    size; no per-layer quota), without sorting N numbers (N is 7e9 for an 8B model): a binary
    search finds the k-th largest score t on the scores' bit patterns (int32 order = float order
    for non-negative floats); every score > t is kept and, of those equal to t, the first in
    matrix then index order. So exactly k are kept, and the mask at a smaller ratio is a subset
    of the mask at a larger one, ties included (the order of a stable sort)."""
    k = int(ratio * sum(s.numel() for s in scores.values()))
    if k == 0:
        return {name: torch.zeros(s.shape, dtype=torch.bool) for name, s in scores.items()}
    keys = {name: s.float().view(torch.int32) for name, s in scores.items()}  # scores >= 0

    def count_at_least(t):  # how many scores have bit pattern >= t
        return sum(int((b >= t).sum()) for b in keys.values())
    lo, hi = 0, 2 ** 31 - 1  # the largest t with count_at_least(t) >= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count_at_least(mid) >= k else (lo, mid - 1)
    ties_left = k - count_at_least(lo + 1)  # every score > t is in; this many ties join
    masks = {}
    for name, b in keys.items():
        tie = (b == lo).flatten()
        take = tie & (torch.cumsum(tie, 0) <= ties_left)  # the first ties_left ties
        ties_left -= int(take.sum())
        above = (b > lo).flatten()
        masks[name] = (above | take).view(b.shape).cpu()
    return masks


def circuit_location(masks: dict) -> dict:
    """Where TaCQ's 16-bit weights are: their number in each module type (q_proj ... down_proj)
    and in each layer, and the share of that module type's / layer's weights they are."""
    where = {"by_module": {}, "by_layer": {}}
    for name, m in masks.items():  # "layers.{i}.self_attn.q_proj"
        _, layer, *_, module = name.split(".")
        for key, part in (("by_module", module), ("by_layer", int(layer))):
            kept, total = where[key].get(part, (0, 0))
            where[key][part] = (kept + int(m.sum()), total + m.numel())
    return {key: {part: {"kept": k, "share": k / n} for part, (k, n) in d.items()}
            for key, d in where.items()}


def print_circuit(where: dict, log=print):
    """The 16-bit weights by module type and by layer, on two lines each."""
    for key, label in (("by_module", "module"), ("by_layer", "layer")):
        parts = where[key]
        log(f"  16-bit weights by {label}: " + ", ".join(
            f"{part}: {v['kept']:,}" for part, v in parts.items()))
        log(f"  share of the {label}'s weights: " + ", ".join(
            f"{part}: {100 * v['share']:.2f}%" for part, v in parts.items()))


def tacq_scores(model: llama.Transformer, calib, answers, cfg: QuantConfig, device=None,
                log=print, G: Optional[dict] = None) -> dict:
    """TaCQ's steps 1-3: gradients on the fp model (or G, computed elsewhere, e.g. over several
    GPUs by scripts/tacq_pipeline.py), the reference GPTQ (no mask), the scores. The model's
    weights are restored before returning."""
    if G is None:
        t0 = time.perf_counter()
        G = gradient_magnitudes(model, calib, answers, log=log)
        log(f"gradient pass: {time.perf_counter() - t0:.0f}s")
    G = dict(G)  # emptied below, one matrix at a time
    # the fp weights wait on the host while GPTQ overwrites them (on a GPU, the model, G and the
    # scores that replace G one by one are what it holds)
    fp = {name: model.get_submodule(name).weight.data.to("cpu", copy=True)
          for name in linear_names(model)}
    log("reference GPTQ (no mask):")
    quantize_model(model, calib, "gptq", cfg, device, log)
    scores = {}
    for name, W in fp.items():
        lin = model.get_submodule(name)
        W = W.to(lin.weight.device)
        scores[name] = tacq_score(W, lin.weight.data, G.pop(name))  # on the model's device
        lin.weight.data = W  # back to the fp weights
    return scores


# -----------------------------------------------------------------------------
# 8. ResQ (Saxena et al. 2024, arXiv 2412.14363), part 1: the exact transformations
#
# In an orthogonal basis U = [U_l | U_h] of the activations, X W^T = (X U)(W U)^T exactly. ResQ
# takes U_h = the top r = d/8 eigen-directions of E[x x^T] (where the energy is, kept at 8 bits)
# and rotates randomly inside each subspace (spreads outliers, keeps the energies). Every change
# of basis here leaves the fp logits unchanged; quantization comes on top (section 8b).


def fold_norms(model: llama.Transformer):
    """Fold each RMSNorm weight g into the linears it feeds and set g = 1. Exact:
    (x / rms(x) * g) W^T = (x / rms(x)) (W diag(g))^T. Unties a tied lm_head first.
    (ResQ's code, after QuaRot's, also subtracts each embedding row's mean, which is exact only
    before a LayerNorm; mixq leaves it out, so that every step here is exact for RMSNorm.)"""
    if model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = torch.nn.Parameter(model.embed_tokens.weight.data.clone(),
                                                  requires_grad=False)
    pairs = [(model.norm, [model.lm_head])]
    for b in model.layers:
        pairs += [(b.input_layernorm, [b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj]),
                  (b.post_attention_layernorm, [b.mlp.gate_proj, b.mlp.up_proj])]
    for norm, linears in pairs:
        for lin in linears:
            lin.weight.data = lin.weight.data * norm.weight.data[None, :]  # W diag(g)
        norm.weight.data = torch.ones_like(norm.weight.data)


@torch.no_grad()
def resq_covariances(model: llama.Transformer, calib, device=None) -> dict:
    """Uncentred second moments in fp64: "resid" (d, d) over the inputs of q/k/v and
    of gate/up in every layer; per layer "value" (n_kv, hd, hd) of each KV head's v_proj outputs
    and "key" (hd, hd) of the keys after RoPE, summed over KV heads. Each divided by its count.
    Layer by layer like quantize_model: one block on `device` at a time, the activations of
    every sample kept between blocks, the sums on `device`."""
    a = model.args
    L, hd = len(model.layers), a.head_dim
    device = torch.device(device or model.device)
    home = model.device
    cov = {"resid": torch.zeros(a.dim, a.dim, dtype=torch.float64, device=device),
           "value": torch.zeros(L, a.n_kv_heads, hd, hd, dtype=torch.float64, device=device),
           "key": torch.zeros(L, hd, hd, dtype=torch.float64, device=device)}
    xs, store, rope = block_inputs(model, calib, device)  # each (1, T, d)
    for li, b in enumerate(model.layers):
        b.to(device)
        for i, x in enumerate(xs):
            x = x.to(device, non_blocking=True)
            T = x.shape[1]
            cos, sin = rope(x)
            h = b.input_layernorm(x)
            g = b.post_attention_layernorm(x + b.self_attn(h, cos, sin))
            for inp in (h, g):
                f = inp.reshape(-1, a.dim).double()
                cov["resid"] += f.T @ f
            v = b.self_attn.v_proj(h).view(T, a.n_kv_heads, hd).double()  # (T, Hkv, hd)
            cov["value"][li] += torch.einsum("thi,thj->hij", v, v)
            k = b.self_attn.k_proj(h).view(1, T, a.n_kv_heads, hd).transpose(1, 2)
            k = llama.apply_rope(k, cos, sin)[0].double()  # (Hkv, T, hd)
            cov["key"][li] += torch.einsum("hti,htj->ij", k, k)
            xs[i] = store(b(x, cos, sin))
        b.to(home)
    tokens = sum(x.shape[1] for x in xs)
    cov["resid"] /= 2 * L * tokens
    cov["value"] /= tokens
    cov["key"] /= tokens * a.n_kv_heads
    return {k: v.cpu() for k, v in cov.items()}


def pca_basis(cov: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Eigenvectors of cov (+ percdamp * mean diag, as ResQ), as columns in ascending eigenvalue
    order: the last r columns span the top-r subspace, the most energy of any rank-r subspace."""
    n = cov.shape[-1]
    damp = percdamp * torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    _, vecs = torch.linalg.eigh(cov + damp * torch.eye(n, dtype=cov.dtype))
    return vecs


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix: QR of a Gaussian, signs fixed by diag(R)."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def subspace_rotation(P: torch.Tensor, r: int, gen: torch.Generator) -> torch.Tensor:
    """U = P blockdiag(R_low, R_high): a random rotation inside each subspace of the basis P."""
    n = P.shape[-1]
    R = torch.block_diag(random_orthogonal(n - r, gen), random_orthogonal(r, gen)) if r else \
        random_orthogonal(n, gen)
    return P @ R


def odd_factor(n: int, gen: torch.Generator) -> Optional[torch.Tensor]:
    """The random orthogonal m x m matrix for n = m * 2^k, m odd > 1 (None if n is 2^k).
    (ResQ's code takes a known Hadamard matrix of size 12, 20, 28, ... for that factor, e.g.
    14336 = 28 * 512, through the fast-hadamard-transform package; any orthogonal factor keeps
    the transform exact, and a random one needs no table of special matrices.)"""
    m = n
    while m % 2 == 0:
        m //= 2
    return None if m == 1 else random_orthogonal(m, gen)


def resq_basis(cov: torch.Tensor, r: int, gen: torch.Generator) -> torch.Tensor:
    """ResQ's basis of one space from the second moment cov (n, n) of its activations:
        U = [U_l R_l | U_h R_h]   (n, n)
    U_h: the eigenvectors of the r largest eigenvalues (the high slice, kept at 8 bits), U_l the
    others; R_l, R_h random rotations inside each subspace. Channels n - r .. n - 1 of x U are
    the high slice."""
    return subspace_rotation(pca_basis(cov), r, gen)  # pca_basis: ascending, so U_h is last


@dataclass
class ResQBases:
    U_A: torch.Tensor  # (d, d) the residual stream's basis, shared by all layers
    U_V: torch.Tensor  # (L, n_kv, hd, hd) per layer and KV head, for values
    U_K: torch.Tensor  # (L, hd, hd) per layer, for keys after RoPE (applied online)
    hadamard: bool  # an online Hadamard transform before down_proj
    odd: Optional[torch.Tensor]  # its odd factor (None when hidden_dim is a power of two)


def resq_bases(cov: dict, args: llama.ModelArgs, high_fraction: float = 0.125,
               rotation: str = "pca", seed: int = 0) -> ResQBases:
    """rotation "pca" (ResQ: PCA, then random rotations inside each subspace), "random"
    (QuaRot-style: one random rotation, no subspaces), "none" (identity)."""
    gen = torch.Generator().manual_seed(seed)
    L = cov["key"].shape[0]  # the layers measured (all of them, but for benchmarks)

    def basis(c):
        n = c.shape[-1]
        if rotation == "none":
            return torch.eye(n, dtype=torch.float64)
        if rotation == "random":
            return random_orthogonal(n, gen)
        return resq_basis(c, int(high_fraction * n), gen)
    U_V = torch.stack([torch.stack([basis(cov["value"][li, h]) for h in range(args.n_kv_heads)])
                       for li in range(L)])
    return ResQBases(basis(cov["resid"]), U_V, torch.stack([basis(cov["key"][li])
                                                            for li in range(L)]),
                     rotation != "none", odd_factor(args.hidden_dim, gen))


def weight_on(lin, device) -> torch.Tensor:
    """A linear's weight in fp32 on `device` (a copy when it moves)."""
    return lin.weight.data.to(device).float()


def set_weight(lin, W: torch.Tensor):
    """Put W back where the linear lives, in its dtype."""
    lin.weight.data = W.to(lin.weight.device, lin.weight.dtype)


@torch.no_grad()
def fuse_residual_basis(model: llama.Transformer, U: torch.Tensor, device):
    """The residual stream in the basis U_A (d, d): x -> x U everywhere. Embedding rows and the
    inputs of q/k/v/gate/up/lm_head: W -> W U; outputs of o/down: W -> U^T W."""
    U = U.float().to(device)
    for lin in (model.embed_tokens, model.lm_head):
        set_weight(lin, weight_on(lin, device) @ U)
    for b in model.layers:
        att, mlp = b.self_attn, b.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
            set_weight(lin, weight_on(lin, device) @ U)  # inputs in the U_A basis
        for lin in (att.o_proj, mlp.down_proj):
            set_weight(lin, U.T @ weight_on(lin, device))  # outputs into it


@torch.no_grad()
def fuse_value_bases(model: llama.Transformer, U_V: torch.Tensor, device):
    """Each KV head's values in its own basis U_V[layer, head] (hd, hd): v_proj's rows of that
    head W -> U_V^T W, and o_proj's columns of every query head that reads it W -> W U_V."""
    a = model.args
    hd, rep = a.head_dim, a.n_heads // a.n_kv_heads
    for li, b in enumerate(model.layers):
        att = b.self_attn
        Wv, Wo = weight_on(att.v_proj, device), weight_on(att.o_proj, device)
        for h in range(a.n_kv_heads):
            UV = U_V[li, h].float().to(device)
            Wv[h * hd:(h + 1) * hd] = UV.T @ Wv[h * hd:(h + 1) * hd]
            for j in range(h * rep, (h + 1) * rep):  # the query heads that read KV head h
                Wo[:, j * hd:(j + 1) * hd] = Wo[:, j * hd:(j + 1) * hd] @ UV
        set_weight(att.v_proj, Wv)
        set_weight(att.o_proj, Wo)


@torch.no_grad()
def install_online_rotations(model: llama.Transformer, bases: ResQBases, device):
    """The two changes of basis that cannot be fused: the keys after RoPE (q, k -> q U_K, k U_K,
    so q k^T is unchanged) and, with bases.hadamard, down_proj's input (h -> h H, with W H
    fused: (h H)(W H)^T = h W^T for orthonormal H)."""
    for li, b in enumerate(model.layers):
        where = b.self_attn.o_proj.weight.device
        b.self_attn.post_rope = llama.KeyRotation(bases.U_K[li]).to(where)
        if bases.hadamard:
            down = b.mlp.down_proj
            set_weight(down, llama.hadamard_transform(weight_on(down, device), bases.odd))
            b.mlp.online_hadamard = llama.OnlineHadamard(bases.odd).to(where)


def fuse_resq(model: llama.Transformer, bases: ResQBases, device=None):
    """Write every fixed change of basis into the weights of a model whose norms are folded,
    and install the online ones. The fp logits do not change (tests/test_resq.py). The products
    run on `device`, one weight there at a time."""
    norms = [model.norm] + [n for b in model.layers
                            for n in (b.input_layernorm, b.post_attention_layernorm)]
    if any((n.weight != 1).any() for n in norms):  # RMSNorm(x U) = RMSNorm(x) U needs g = 1
        raise ValueError("fuse_resq: fold_norms(model) first, and compute the bases after it")
    device = torch.device(device or model.device)
    fuse_residual_basis(model, bases.U_A, device)  # embedding, attention and MLP inputs, head
    fuse_value_bases(model, bases.U_V, device)  # values and o_proj, per KV head
    install_online_rotations(model, bases, device)  # keys after RoPE, down_proj's input


# -----------------------------------------------------------------------------
# 8b. ResQ, part 2: W4A4KV4 fake quantization on the fused model
#
# Activations per token, asymmetric, the low slice at abits and the high slice (the last
# r channels: the top-r PCA directions) at high_bits; o_proj inputs and the KV cache per head
# with the same split; down_proj inputs (after the Hadamard) uniform at abits; lm_head 16-bit.
# As in ResQ's code, the per-token grids contain 0 and the per-head grids of o_proj's inputs
# and of the values are plain min-max (the keys' contain 0); with a quantized KV cache, q and k
# are quantized per token and head to 8 bits before the key rotation, whose U_K is 8-bit too.
# Weights: GPTQ per channel, symmetric, MSE clipping, high columns on their own 8-bit grid.

QK_BITS = 8  # q, k and U_K before the key rotation (ResQ's code fixes 8)


def quantize_activations(x, bits: int, high_bits: int = 8, r: int = 0, zero_in_range=True):
    """Fake-quantize each row of x (..., n) on its own: channels [0, n - r) at `bits`, the last r
    at `high_bits`, each slice with its own asymmetric min-max grid (fit_grid's, without MSE),
    whose range contains 0 unless zero_in_range is False. bits >= 16 or high_bits >= 16 leave
    that slice exact. Rows never see each other: batch-independent. (model.quantize_slices, which
    a saved ResQ model runs too; its grid is kernels.activation_codes, tied to fit_grid by a
    test.)"""
    return llama.quantize_slices(x, bits, high_bits, r, zero_in_range)


def per_head(fn, hd: int):
    """fn applied to each head slice of hd channels of the last axis."""
    def apply(x):
        return fn(x.reshape(*x.shape[:-1], -1, hd)).reshape(x.shape)
    return apply


def n_high(n: int, cfg: QuantConfig) -> int:
    """Channels of an n-wide space in ResQ's high slice: its top high_fraction * n PCA
    directions (none without PCA)."""
    return int(cfg.high_fraction * n) if cfg.rotation == "pca" else 0


def resq_high_columns(name: str, args: llama.ModelArgs, cfg: QuantConfig):
    """The input columns a linear keeps on the 8-bit grid (None: all at wbits): the last r of the
    residual basis for q/k/v/gate/up, the last hd/8 of every head for o_proj, none for down."""
    if cfg.rotation != "pca" or cfg.high_fraction == 0:
        return None
    hd = args.head_dim
    if name.endswith("o_proj"):
        return (torch.arange(args.n_heads * hd) % hd) >= hd - n_high(hd, cfg)
    if name.endswith("down_proj"):
        return None
    return torch.arange(args.dim) >= args.dim - n_high(args.dim, cfg)


class FakeQuantLinear(torch.nn.Module):
    """y = Q(x) W^T: the input fake-quantized by `quantize`, then the product group by group
    (`groups`: the input columns of each group of each slice, in kernels.ResQLinear's order).
    Q(x) and the ResQ weights are exact in fp32 (fp16 scales times small integers) and share one
    scale pair inside a group, so a group's product in fp64 is exact: each is rounded once to
    fp32, then the groups are summed in fp32 in order, as the integer path does: the same
    numbers, bit for bit."""

    def __init__(self, linear: torch.nn.Linear, quantize, groups: list):
        super().__init__()
        self.weight, self.quantize, self.groups = linear.weight, quantize, groups
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        xq, W, y = self.quantize(x).double(), self.weight.double(), None
        for cols in self.groups:
            t = F.linear(xq[..., cols], W[:, cols]).float()  # exact, then rounded once
            y = t if y is None else y + t
        return y.to(x.dtype)


def resq_groups(name: str, args: llama.ModelArgs, cfg: QuantConfig) -> list:
    """The input columns of each activation group of a ResQ linear, slice after slice."""
    slices, perm = resq_slices(name, args, cfg)
    order = torch.arange(sum(sl["width"] for sl in slices)) if perm is None else perm
    return list(order.split([sl["group"] for sl in slices
                             for _ in range(sl["width"] // sl["group"])]))


def install_resq_quantizers(model: llama.Transformer, cfg: QuantConfig):
    """ResQ's quantizers on the fused model: each linear's input fake-quantized
    (FakeQuantLinear), and on each attention the KV-cache grids (model.KVQuantizer) and the
    8-bit q, k and U_K of the key rotation."""
    a = model.args
    r_res, r_head = n_high(a.dim, cfg), n_high(a.head_dim, cfg)
    tokens = lambda r: lambda x: quantize_activations(x, cfg.abits, cfg.high_bits, r)  # noqa
    heads = per_head(lambda x: quantize_activations(x, cfg.abits, cfg.high_bits, r_head,
                                                    zero_in_range=False), a.head_dim)
    for b in model.layers:
        att, mlp = b.self_attn, b.mlp
        if cfg.abits < 16:
            for parent, name, quantize in ((att, "q_proj", tokens(r_res)),
                                           (att, "k_proj", tokens(r_res)),
                                           (att, "v_proj", tokens(r_res)), (att, "o_proj", heads),
                                           (mlp, "gate_proj", tokens(r_res)),
                                           (mlp, "up_proj", tokens(r_res)),
                                           (mlp, "down_proj", tokens(0))):
                groups = resq_groups(name, a, cfg)
                setattr(parent, name, FakeQuantLinear(getattr(parent, name), quantize, groups))
        if cfg.kvbits < 16:
            att.kv_quant = llama.KVQuantizer(cfg.kvbits, cfg.high_bits, r_head)
            if att.post_rope is None:
                att.post_rope = llama.KeyRotation(torch.eye(a.head_dim)).to(model.device)
            att.post_rope.input_bits = QK_BITS


def resq_slices(name: str, args: llama.ModelArgs, cfg: QuantConfig):
    """How a ResQ linear reads its input, for kernels.ResQLinear -> (slices, perm or None): the
    low channels at abits then the high at high_bits, each with a per-token grid (o_proj: per
    head, plain min-max; perm puts every head's low channels before every head's high ones);
    down_proj one slice at abits."""
    high = resq_high_columns(name, args, cfg)
    K = args.hidden_dim if name.endswith("down_proj") else \
        args.n_heads * args.head_dim if name.endswith("o_proj") else args.dim
    a_low, a_high = (16, 16) if cfg.abits >= 16 else (cfg.abits, cfg.high_bits)  # 16: fp
    o_proj = name.endswith("o_proj")
    heads = args.n_heads if o_proj else 1
    if high is None:
        return [dict(width=K, bits=cfg.wbits, act_bits=a_low, group=K // heads,
                     zero_in_range=not o_proj)], None
    r = int(high.sum())
    slices = [dict(width=K - r, bits=cfg.wbits, act_bits=a_low, group=(K - r) // heads,
                   zero_in_range=not o_proj),
              dict(width=r, bits=cfg.high_bits, act_bits=a_high, group=r // heads,
                   zero_in_range=not o_proj)]
    perm = torch.cat([torch.nonzero(~high).flatten(), torch.nonzero(high).flatten()])
    return slices, (perm if o_proj else None)


def resq_tensors(qz: Quantized, name: str, args: llama.ModelArgs, cfg: QuantConfig) -> dict:
    """The stored form of one ResQ linear (kernels.ResQLinear's format), on the CPU: the
    weight codes of each slice (codes - 2^(b-1) is ResQ's signed code) packed, its scales."""
    slices, perm = resq_slices(name, args, cfg)
    high = resq_high_columns(name, args, cfg)
    cols = [torch.arange(qz.codes.shape[1])] if high is None else \
        [torch.nonzero(~high).flatten(), torch.nonzero(high).flatten()]
    tensors = {} if perm is None else {"perm": perm}
    for i, (sl, c) in enumerate(zip(slices, cols)):
        codes = qz.codes[:, c.to(qz.codes.device)].T.to(torch.int64).cpu()  # (K_i, N)
        tensors[f"qweight_{i}"] = kernels.pack(codes, sl["bits"])
        tensors[f"scale_{i}"] = qz.scales[:, i].half().cpu()
    return tensors


def resq_linear(qz: Quantized, name: str, args: llama.ModelArgs, cfg: QuantConfig):
    """A ResQ result as kernels.ResQLinear, the integer form of the fake-quantized linear."""
    slices, _ = resq_slices(name, args, cfg)
    return kernels.ResQLinear(qz.codes.shape[1], qz.codes.shape[0], slices,
                              resq_tensors(qz, name, args, cfg))


def resq_config(args: llama.ModelArgs, cfg: QuantConfig, modules) -> dict:
    """What a saved ResQ model needs beside its tensors to run: the activation, KV and q/k bits,
    the KV cache's high slice, and how each linear reads its input (resq_slices)."""
    return {"abits": cfg.abits, "kvbits": cfg.kvbits, "high_bits": cfg.high_bits,
            "kv_high": n_high(args.head_dim, cfg), "qk_bits": QK_BITS if cfg.kvbits < 16 else 16,
            "hadamard": cfg.rotation != "none",
            "slices": {llama.ours_to_hf(m): resq_slices(m, args, cfg)[0] for m in sorted(modules)}}


def check_resq_saveable(args: llama.ModelArgs, cfg: QuantConfig):
    """Refuse a ResQ run whose result kernels.ResQLinear cannot store, before any work."""
    if cfg.wbits not in (2, 4, 8) or cfg.high_bits not in (2, 4, 8):
        raise ValueError(f"--save of ResQ stores 2-, 4- or 8-bit weight codes; --wbits "
                         f"{cfg.wbits} --high-bits {cfg.high_bits} can be evaluated but not saved")
    if not (2 <= cfg.abits <= 8 or cfg.abits == 16):
        raise ValueError(f"--save of ResQ runs its activations as int8 codes: --abits 2-8 (or "
                         f"16, unquantized), not {cfg.abits}")
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        for sl in resq_slices(name, args, cfg)[0]:
            if sl["width"] * sl["bits"] % 32:
                raise ValueError(f"--save of ResQ: {sl['width']} input channels of {name} at "
                                 f"{sl['bits']} bits do not fill whole 32-bit words; choose "
                                 "other --wbits / --high-bits")


def activation_bits(args: llama.ModelArgs, cfg: QuantConfig) -> float:
    """Average activation bits over the inputs of the seven linears (per input channel)."""
    if cfg.abits >= 16:
        return 16.0
    d, hd, ff = args.dim, args.head_dim, args.hidden_dim
    total = 5 * d + args.n_heads * hd + ff  # inputs of q, k, v, gate, up; o; down
    high = 5 * n_high(d, cfg) + args.n_heads * n_high(hd, cfg)  # down_proj: all low
    return (cfg.high_bits * high + cfg.abits * (total - high)) / total


@torch.no_grad()
def resq_prepare(model: llama.Transformer, calib, cfg: QuantConfig, seed: int = 0, log=print,
                 device=None):
    """Fold the norms, then covariances, bases and fusion (one block on `device` at a time): the
    model is still fp, in the new bases."""
    t0 = time.perf_counter()
    # the norms first: the bases are of the activations that get quantized, x / rms(x), not of
    # g * x / rms(x) (g moves into the weights). As ResQ's get_basis.py does. (Its bases come
    # from 512 x 2048 tokens of WikiText-2 and its GPTQ from 128 x 2048; mixq uses the same
    # calibration windows for both.)
    fold_norms(model)
    cov = resq_covariances(model, calib, device)
    high_fraction = cfg.high_fraction if cfg.rotation == "pca" else 0.0
    fuse_resq(model, resq_bases(cov, model.args, high_fraction, cfg.rotation, seed), device)
    log(f"ResQ bases ({cfg.rotation}, high fraction {high_fraction}) fused in "
        f"{time.perf_counter() - t0:.0f}s")


def resq(model: llama.Transformer, calib, cfg: QuantConfig, seed: int = 0, device=None,
         log=print, **pipeline) -> dict:
    """ResQ on a model, in place, step by step -> the results of its GPTQ:
      1. fold each RMSNorm's gain into the linears it feeds      fold_norms
      2. second moments of the activations to be quantized      resq_covariances
      3. bases: PCA, its top 1/8 the high slice, random          resq_bases
         rotations inside each slice
      4. the bases written into the weights, and the online      fuse_resq
         key rotation and Hadamard transform
      5. GPTQ of the weights, high columns on an 8-bit grid     quantize_model(..., "resq")
      6. activation and KV-cache quantizers (W4A4KV4)           install_resq_quantizers
    Steps 1-4 are resq_prepare, which leaves the fp model in the new bases. pipeline: options
    of quantize_model (the CLI's resume)."""
    resq_prepare(model, calib, cfg, seed, log, device)  # steps 1-4
    results = quantize_model(model, calib, "resq", cfg, device, log, **pipeline)  # step 5
    install_resq_quantizers(model, cfg)  # step 6
    return results


# -----------------------------------------------------------------------------
# 9. Save: the packed format of kernels.py, written atomically; export to other tools' formats


PACKED_BITS = (2, 3, 4, 8)  # the widths the packed format (and the kernel) stores


def packed_tensors(qz: Quantized) -> dict:
    """The stored form of one quantized linear (layout in kernels.py), on the CPU."""
    codes = qz.codes.to(torch.uint8).T.contiguous().cpu()  # (K=n, N=m)
    t = kernels.pack_codes(codes, qz.bits)
    t["scales"] = qz.scales.T.contiguous().half().cpu()  # (ceil(n/g), m)
    t["zeros"] = qz.zeros.T.contiguous().half().cpu()
    if qz.kept is not None:
        t |= kernels.to_csr(qz.delta.cpu(), qz.kept.cpu())
    return t


def check_save_dir(out_dir):
    """The save replaces out_dir: only an empty or new directory or an earlier mixq checkpoint
    (never the source checkpoint, or any other directory with files in it)."""
    llama.check_replaceable(out_dir)
    cfg = Path(out_dir) / "config.json"
    if not cfg.exists():
        return
    written = json.loads(cfg.read_text())
    if (written.get("quantization_config") or {}).get("quant_method") != "mixq" and \
            "mixq_export" not in written:
        raise ValueError(f"{out_dir} holds a checkpoint mixq did not write; "
                         "choose a new directory")


# A native checkpoint names an architecture no other tool knows: transformers and vLLM refuse it
# ("model type `mixq_llama` ... does not recognize this architecture") instead of loading the
# packed linears as random weights. model.py reads it; --export writes what they read.
NATIVE_ARCHITECTURE = {"model_type": "mixq_llama", "architectures": ["MixqLlamaForCausalLM"]}


def save_quantized(model: llama.Transformer, results: dict, source, out_dir, qconfig: dict,
                   tok=None):
    """A checkpoint directory: config.json with quantization_config, model.safetensors (packed
    linears; the rest in the source checkpoint's dtype), the source's tokenizer, chat template
    and generation_config.json. Written to a temp dir, then renamed."""
    from safetensors.torch import save_file
    check_save_dir(out_dir)
    dtype = llama.stored_dtype(source) if source and Path(source).is_dir() else None
    tied = model.lm_head.weight is model.embed_tokens.weight  # (ResQ unties them)
    tensors = {}
    for name, p in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in results or (name == "lm_head.weight" and tied):
            continue
        if name.endswith((".U_K", ".odd")):  # ResQ's online rotations: fp32, as they run
            tensors[llama.ours_to_hf(name)] = p.float().contiguous()
            continue
        tensors[llama.ours_to_hf(name)] = (p if dtype is None else p.to(dtype)).contiguous()
    for module, r in results.items():
        if r["tensors"] is None:
            raise ValueError(f"{module}: its result has no stored form (the options it was "
                             "quantized with cannot be saved)")
        for k, v in r["tensors"].items():
            tensors[llama.ours_to_hf(f"{module}.{k}")] = v
    fmt = kernels.RESQ_FORMAT if "resq" in qconfig else kernels.FORMAT
    qconfig = qconfig | {"format": fmt,  # what model.load checks it can read
                         "modules": sorted(llama.ours_to_hf(m) for m in results)}
    dtype = dtype or model.embed_tokens.weight.dtype  # no source directory: as in memory
    cfg = model.args.to_hf() | NATIVE_ARCHITECTURE | {"torch_dtype": str(dtype)[6:],
                                                      "tie_word_embeddings": tied,
                                                      "quantization_config": qconfig}
    with llama.atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if source:
            write_side_files(source, tok, tmp)


def write_side_files(source, tok, out_dir):
    """The source's tokenizer files, chat template and generation_config.json; from a GGUF
    source (no such files), the tokenizer as loaded."""
    if Path(source).is_dir():
        llama.copy_tokenizer(source, out_dir)
    if tok is not None and not (Path(out_dir) / "tokenizer.json").exists():
        tok.tok.save(str(Path(out_dir) / "tokenizer.json"))
        (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": tok.chat_template, **tok.special_tokens}, indent=2))


# -- Export: the same codes in the formats other tools serve (model.py reads both back:
# gptq_parts, ct_parts). Per linear W (N out x K in), G = ceil(K/g) groups:
#   GPTQ (AutoGPTQ / GPTQModel; transformers, vLLM): qweight int32 (K*b/32, N), codes packed
#     along K (kernels.pack_dense); qzeros int32 (G, N*b/32), zero points packed along N, as
#     z - 1 ("gptq", v1) or z ("gptq_v2"); scales fp16 (G, N); g_idx int32 (K,) = k // g.
#     v1 cannot hold z = 0 (a group whose range starts at 0): such a model is written as v2.
#     GPTQModel.load needs v2 for an asymmetric grid (it takes asymmetric v1 only from itself).
#   compressed-tensors "pack-quantized" (llm-compressor; vLLM): weight_packed int32 (N, K*b/32),
#     weight_scale (N, G), weight_shape [N, K], and for asymmetric grids weight_zero_point int32
#     (N*b/32, G); W = weight_scale * (q_s - zp_s) with signed q_s = q - 2^(b-1),
#     zp_s = z - 2^(b-1). Its groups must divide K.

EXPORT_FORMATS = ("gptq", "gptq_v2", "compressed-tensors")


def check_export_groups(fmt: str, g: int, in_features):
    """compressed-tensors' group strategy needs g to divide every linear's input size (GPTQ
    stores a partial last group)."""
    partial = sorted({K for K in in_features if g != -1 and K % g})
    if fmt == "compressed-tensors" and partial:
        raise ValueError(f"--export compressed-tensors: its groups must divide each linear's "
                         f"inputs, and {g} does not divide {', '.join(map(str, partial))} (a "
                         f"partial last group); export as gptq, or use a --groupsize that does")


def export_layers(tensors: dict, bits: int, g: int, fmt: str, drop_kept: bool, log=print,
                  scale_dtype=torch.float32):
    """mixq's packed tensors {hf name: tensor} -> (the tensors of `fmt`, its quantization
    config). Weights kept in 16 bits have no place in either format: refused, or with
    drop_kept left at their codes' values (a printed count)."""
    modules = sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith(".qweight")})
    kept = sum(tensors[f"{m}.outlier_vals"].numel() for m in modules
               if f"{m}.outlier_vals" in tensors)
    if kept and not drop_kept:
        raise ValueError(f"the checkpoint keeps {kept:,} weights in 16 bits, which {fmt} cannot "
                         "store: --export-drop-kept drops them (each becomes its code's value; "
                         "accuracy drops: evaluate the result)")
    if kept:
        log(f"export: dropping {kept:,} weights kept in 16 bits (they take their codes' values)")
    check_export_groups(fmt, g, [kernels_K(tensors[f"{m}.qweight"], bits) for m in modules])
    half = 1 << (bits - 1)
    zeros = {m: tensors[f"{m}.zeros"].float() for m in modules}
    if any(not torch.equal(z, z.round()) or z.min() < 0 or z.max() >= 2 ** bits
           for z in zeros.values()):
        raise ValueError(f"{fmt} stores integer zero points in [0, 2^{bits}); this checkpoint's "
                         "are not (a signed grid?)")
    sym = all(bool((z == half).all()) for z in zeros.values())
    v1 = fmt == "gptq" and all(bool((z >= 1).all()) for z in zeros.values())  # stores z - 1
    out = {n: t for n, t in tensors.items() if n.rsplit(".", 1)[0] not in modules}
    for m in modules:
        t = {leaf: tensors[f"{m}.{leaf}"] for leaf in ("qweight", "qweight_hi")
             if f"{m}.{leaf}" in tensors}
        s = tensors[f"{m}.scales"].half()  # (G, N)
        K, N = kernels_K(tensors[f"{m}.qweight"], bits), s.shape[1]
        codes = kernels.unpack_codes(t, bits, K)  # (K, N)
        z = zeros[m].to(torch.uint8)  # (G, N)
        if fmt.startswith("gptq"):
            out[f"{m}.qweight"] = kernels.pack_dense(codes, bits)
            out[f"{m}.qzeros"] = kernels.pack_dense((z - int(v1)).T, bits).T.contiguous()
            out[f"{m}.scales"] = s
            out[f"{m}.g_idx"] = (torch.arange(K) // (K if g == -1 else g)).to(torch.int32)
        else:
            out[f"{m}.weight_packed"] = kernels.pack_dense(codes, bits).T.contiguous()
            out[f"{m}.weight_scale"] = s.T.to(scale_dtype).contiguous()
            out[f"{m}.weight_shape"] = torch.tensor([N, K])
            if not sym:
                out[f"{m}.weight_zero_point"] = kernels.pack_dense(z.T, bits)
    if fmt.startswith("gptq"):
        qc = {"quant_method": "gptq", "bits": bits, "group_size": g, "desc_act": False,
              "sym": sym, "static_groups": False, "true_sequential": True, "lm_head": False,
              "checkpoint_format": "gptq" if v1 else "gptq_v2"}
        if fmt == "gptq" and not v1:
            log("export: some zero points are 0, which GPTQ v1 (z - 1) cannot store: written as "
                "checkpoint_format gptq_v2 (GPTQModel reads it; vLLM reads v1 only)")
    else:
        strategy = {"strategy": "channel"} if g == -1 else {"strategy": "group", "group_size": g}
        weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
                   "actorder": None, **strategy}
        qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "quantization_status": "compressed", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                            "input_activations": None,
                                            "output_activations": None,
                                            "format": "pack-quantized"}},
              "kv_cache_scheme": None, "sparsity_config": {}}
    return out, qc


def kernels_K(qweight: torch.Tensor, bits: int) -> int:
    """K (in_features) of mixq's packed qweight: 3-bit codes keep their low 2 bits there."""
    return qweight.shape[0] * 32 // (2 if bits == 3 else bits)


def export_quantized(src, fmt: str, out_dir, drop_kept: bool = False, log=print):
    """A saved mixq checkpoint directory -> the same weights in `fmt` (EXPORT_FORMATS): a
    directory transformers (with compressed-tensors or gptqmodel) and vLLM load. Atomic."""
    from safetensors.torch import load_file, save_file
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--export {fmt}: choose one of {', '.join(EXPORT_FORMATS)}")
    src = Path(src)
    cfg = llama.read_config(src)
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "mixq":
        raise ValueError(f"{src}: not a mixq checkpoint (quant_method "
                         f"{qc.get('quant_method')!r}); quantize with --save first")
    if "resq" in qc:
        raise ValueError(f"{src}: a ResQ checkpoint; no other tool runs ResQ's 4/8-bit subspaces "
                         "and quantized activations, so it has no export")
    if Path(out_dir).resolve() == src.resolve():
        raise ValueError(f"--export {out_dir}: that is the checkpoint it reads")
    check_save_dir(out_dir)
    tensors = load_file(str(src / "model.safetensors"))
    # compressed-tensors dequantizes in the scales' dtype: fp32 (fp16 for an fp16 model) holds
    # mixq's fp16 scales exactly, so the weights are mixq's to the bit; bf16 would round them
    scale_dtype = torch.float16 if cfg.get("torch_dtype") == "float16" else torch.float32
    out, export_qc = export_layers(tensors, qc["bits"], qc["group_size"], fmt, drop_kept, log,
                                   scale_dtype)
    args = llama.ModelArgs.from_hf(cfg)
    new_cfg = args.to_hf() | {"torch_dtype": cfg.get("torch_dtype", "float32"),
                              "quantization_config": export_qc,
                              "mixq_export": {"method": qc.get("method")}}  # mixq wrote it
    with llama.atomic_dir(out_dir) as tmp:
        save_file({n: t.contiguous() for n, t in out.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2))
        if fmt.startswith("gptq"):  # AutoGPTQ and GPTQModel read the config from this file
            (tmp / "quantize_config.json").write_text(json.dumps(export_qc, indent=2))
        llama.copy_tokenizer(src, tmp)
    kind = f"checkpoint_format {export_qc['checkpoint_format']}" if fmt.startswith("gptq") \
        else "pack-quantized"
    log(f"exported to {out_dir} ({fmt}: {kind})")


# -----------------------------------------------------------------------------
# 10. CLI


@dataclass
class Job:
    """The rest of a `python mixq.py` run: the model, the data, the evaluation and the outputs
    (QuantConfig holds the method's options). Every field is a flag."""
    ckpt: Optional[str] = option(None, "short name, HF directory or .gguf file; None: the "
                                 "embedded SmolLM2-135M-Instruct")
    method: str = option("tacq", "quantization algorithm", choices=METHODS)
    calib: str = option("pydoc", "calibration data: pydoc (its calibration split) | text:PATH | "
                        "wikitext2:DIR (train file) | task:NAME | jsonl:PATH. pydoc is narrow "
                        "(Python documentation): calibrate on text like the text you will run")
    # the papers calibrate on 128 x 2048 tokens (ResQ's bases on 512 x 2048); 32 x 512 keeps the
    # default job to minutes on a CPU
    nsamples: int = option(32, "calibration samples")
    seqlen: int = option(512, "calibration window length")
    seed: int = option(0, "calibration sampling seed")
    answer_loss: bool = option(False, "TaCQ on a task: mixq's protocol, items packed into "
                               "--seqlen windows and the loss on answer tokens only (default: "
                               "TaCQ's, one item per sample and the loss on every position)")
    evals: tuple = option(("pydoc", "task:capitals"), "perplexity corpora (pydoc, text:PATH, "
                          "wikitext2:DIR) and tasks (task:capitals|compare|arith, jsonl:PATH); "
                          "none (or no value) to skip", flag="--eval", nargs="*")
    eval_seqlen: int = option(512, "perplexity window length")
    eval_windows: Optional[int] = option(None, "evaluate only N windows", type=int)
    task_limit: Optional[int] = option(None, "score only N task items", type=int)
    scores_dir: Optional[str] = option(None, "TaCQ: cache the scores in this directory (another "
                                       "--ratio then needs no new gradients)", flag="--scores")
    save: Optional[str] = option(None, "write the quantized checkpoint here (mixq's own format: "
                                 "model.py, eval.py and mixq's kernels read it)")
    export: Optional[tuple] = option(None, "also write the result in another tool's format "
                                     "(gptq | gptq_v2 | compressed-tensors): transformers and "
                                     "vLLM load it", nargs=2, metavar=("FORMAT", "DIR"))
    drop_kept: bool = option(False, "--export of a method that keeps weights in 16 bits (tacq, "
                             "spqr, outlier QuantEase): drop them", flag="--export-drop-kept")
    resume: Optional[str] = option(None, "save every finished block in this directory and, if it "
                                   "holds an interrupted run with the same settings, continue it")
    json_out: Optional[str] = option(None, "write the summary here (with a record per block: "
                                     "seconds, memory, each linear's error and damping)",
                                     flag="--json")
    device: Optional[str] = option(None, "cpu | cuda; None: cuda when torch sees a GPU, else cpu")
    dtype: Optional[str] = option(None, "model dtype; None: bf16 on a GPU, fp32 on a CPU",
                                  choices=["fp32", "bf16", "fp16"])

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        least = {"nsamples": 1, "seqlen": 2, "eval_seqlen": 2, "eval_windows": 1, "task_limit": 1}
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} {value}: want at least {low}")
        if self.export is not None and self.export[0] not in EXPORT_FORMATS:
            raise ValueError(f"--export {self.export[0]}: choose one of {', '.join(EXPORT_FORMATS)}")
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = self.dtype or ("bf16" if str(self.device).startswith("cuda") else "fp32")


def peak_memory_gb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def method_config(method: str, cfg: QuantConfig) -> QuantConfig:
    """The options a method actually runs with."""
    if method == "resq":  # ResQ's weights: per channel, signed symmetric, MSE clipping
        return replace(cfg, groupsize=-1, sym=True, signed=True, mse=True)
    cfg = replace(cfg, abits=16, kvbits=16)  # only ResQ quantizes activations
    if method == "spqr":
        return spqr_config(cfg)
    if method == "tacq":  # TaCQ's GPTQ settings: asymmetric with MSE clipping
        return replace(cfg, mse=True)
    return cfg


def check_options(job: Job, cfg: QuantConfig):
    """Refuse option combinations that cannot run, before any work (Job and QuantConfig check
    each value on its own)."""
    method, save, export = job.method, job.save or job.export, job.export
    if cfg.act_order and (method == "rtn" or method == "quantease" and cfg.outliers > 0):
        raise ValueError(f"--act-order: {'RTN' if method == 'rtn' else 'outlier-aware QuantEase'}"
                         " has no column order to change; leave --act-order out")
    if method == "resq" and cfg.act_order:
        raise ValueError("--act-order: ResQ's GPTQ takes the low columns first and the high "
                         "columns last; leave --act-order out")
    if method == "resq" and cfg.groupsize != -1:  # method_config would drop it silently
        raise ValueError(f"--groupsize {cfg.groupsize}: ResQ quantizes weights per output "
                         "channel; leave --groupsize out")
    keeps = method in ("tacq", "spqr") or method == "quantease" and cfg.outliers > 0
    if export and keeps and not job.drop_kept:
        raise ValueError(f"--export: {method} keeps weights in 16 bits, which {export[0]} cannot "
                         "store; --export-drop-kept drops them (they take their codes' values), "
                         "or export a method that keeps none")
    if export and method == "resq":
        raise ValueError("--export: no other tool runs ResQ's 4/8-bit subspaces and quantized "
                         "activations; --save writes mixq's own ResQ checkpoint")
    if save and cfg.act_order and not cfg.static_groups and cfg.groupsize != -1 and \
            method in ("gptq", "tacq", "quantease"):
        raise ValueError("--save with --act-order and groups needs --static-groups: dynamic "
                         "groups are not contiguous columns, which the packed format stores")
    if save and cfg.wbits not in PACKED_BITS:
        raise ValueError(f"--save stores {', '.join(map(str, PACKED_BITS))}-bit codes; "
                         f"--wbits {cfg.wbits} can be evaluated but not saved")


def check_paths(job: Job):
    """Every data spec readable and every output path writable, before any work."""
    if job.export is not None:
        check_save_dir(job.export[1])
        if job.save and Path(job.save).resolve() == Path(job.export[1]).resolve():
            raise ValueError(f"--save and --export name the same directory {job.save}")
    for spec in job.evals:
        metrics.check_spec(spec, "eval", "--eval")
    if job.method != "rtn":
        metrics.check_spec(job.calib, "calib", "--calib")
    if job.json_out:
        metrics.check_output_file(job.json_out, "--json")
    if job.save:
        check_save_dir(job.save)
    if job.scores_dir:
        llama.check_replaceable(job.scores_dir, marker="scores.json", files=llama.SCORES_FILES)
    if job.resume:
        check_resume_dir(job.resume)


def run_fingerprint(job: Job, model, method: str, cfg: QuantConfig, calib_tokens) -> dict:
    """What a resumed run (or cached scores) must share with the run that saved them: the model
    and its dtype, the method and every option, the calibration data (a hash of its tokens and
    the loss's protocol), the seed, and the packed format the saved blocks are in."""
    digest = hashlib.sha256()
    for t in calib_tokens if calib_tokens is not None else []:
        digest.update(t.to(torch.int64).numpy().tobytes())
    return {"ckpt": str(job.ckpt or llama.DEFAULT_MODEL), "model": json.dumps(model.args.to_hf()),
            "method": method, "options": json.dumps(asdict(cfg) | {
                "outlier_threshold": str(cfg.outlier_threshold)}),
            "calib": job.calib + (" (answer loss)" if job.answer_loss else ""),
            "calib_sha256": digest.hexdigest(), "seed": job.seed, "dtype": str(job.dtype),
            "format": kernels.FORMAT}


def cached_tacq_scores(model, calib, answers, cfg, fingerprint: dict, scores_dir, device=None,
                       log=print) -> dict:
    """tacq_scores, cached in scores_dir (safetensors + scores.json, the fingerprint of the
    model, the data and the options), so another ratio costs no new gradients."""
    from safetensors.torch import load_file, save_file
    d = Path(scores_dir)
    if saved_state(d / "scores.json", fingerprint, "--scores", "scores for") is not None:
        log(f"scores: reusing {d}")
        return load_file(str(d / "scores.safetensors"))
    scores = tacq_scores(model, calib, answers, cfg, device, log)
    with llama.atomic_dir(d, marker="scores.json", files=llama.SCORES_FILES) as tmp:
        save_file({k: v.cpu() for k, v in scores.items()}, str(tmp / "scores.safetensors"))
        (tmp / "scores.json").write_text(json.dumps({"fingerprint": fingerprint}, indent=2))
    return scores


def run(cfg: Optional[QuantConfig] = None, **options) -> dict:
    """The whole job, as `python mixq.py` runs it: check the options and paths, load the model,
    tokenize the calibration data, evaluate the fp model, quantize, evaluate again, print a
    summary table, save and export. cfg None: QuantConfig()'s defaults; options: Job's fields
    (method="gptq", export=("gptq", DIR), ...). Returns the summary (also --json)."""
    cfg, job = cfg or QuantConfig(), Job(**options)
    method = job.method
    # 1. everything that can be checked before loading: a bad option fails now, not an hour in
    check_options(job, cfg)
    check_paths(job)
    run_cfg = method_config(method, cfg)  # what the method runs with, e.g. TaCQ's MSE clipping
    # 2. the model, the calibration data and the fingerprints, still before the fp evaluation
    model, tok = llama.load(job.ckpt, job.dtype, job.device)
    if tok is None:
        raise llama.CheckpointError("the checkpoint has no tokenizer.json")
    if job.save and method == "resq":
        check_resq_saveable(model.args, run_cfg)
    if job.export:
        check_export_groups(job.export[0], run_cfg.groupsize,
                            (model.args.dim, model.args.hidden_dim))
    if start_from_dequantized(model, job.ckpt):
        print(f"{job.ckpt}: a quantized checkpoint; the method starts from its dequantized "
              "weights")
    check_finite_weights(model, job.ckpt)
    calib = answers = None
    if method != "rtn":
        try:
            calib, answers = calibration_data(job.calib, tok, job.nsamples, job.seqlen, job.seed,
                                              job.answer_loss)
        except ValueError as e:
            raise ValueError(f"--calib {job.calib}: {e}") from None
    run_fp = run_fingerprint(job, model, method, run_cfg, calib)
    scores_fp = run_fingerprint(job, model, "tacq scores", replace(run_cfg, ratio=0.0), calib)
    if job.resume:
        resume_state(job.resume, run_fp)
    if job.scores_dir and method == "tacq":
        saved_state(Path(job.scores_dir) / "scores.json", scores_fp, "--scores", "scores for")
    # 3. evaluate, quantize, evaluate
    g = "per-channel" if run_cfg.groupsize == -1 else f"g{run_cfg.groupsize}"
    print(f"mixq: {method} W{cfg.wbits} {g} on {job.ckpt or llama.DEFAULT_MODEL} "
          f"({job.device}, {job.dtype})")
    evals = (job.evals, job.eval_seqlen, job.eval_windows, job.task_limit)
    print("fp model:")
    fp = metrics.evaluate(model, tok, *evals)
    if calib is not None:
        print(f"calibration: {len(calib)} samples, {sum(map(len, calib)):,} tokens from "
              f"{job.calib} (seed {job.seed})")
    t0 = time.perf_counter()
    pipeline = dict(resume=job.resume, fingerprint=run_fp)
    masks = None
    if method == "tacq":
        scores = None if job.scores_dir is None else cached_tacq_scores(
            model, calib, answers, run_cfg, scores_fp, job.scores_dir, job.device)
        results, masks = tacq(model, calib, answers, run_cfg, job.device, print, scores,
                              **pipeline)
    elif method == "resq":
        results = resq(model, calib, run_cfg, job.seed, job.device, print, **pipeline)
    else:
        results = quantize_model(model, calib, method, run_cfg, job.device, **pipeline)
    quant_seconds = time.perf_counter() - t0
    print("quantized model:")
    quant = metrics.evaluate(model, tok, *evals)
    # 4. the summary, the checkpoint, the JSON
    avg = average_bits(results)
    options = asdict(run_cfg) | {"outlier_threshold": str(run_cfg.outlier_threshold)}
    summary = {"method": method, "wbits": cfg.wbits, "groupsize": run_cfg.groupsize,
               "avg_bits": avg, "act_bits": activation_bits(model.args, run_cfg), "fp": fp,
               "quant": quant, "quant_seconds": quant_seconds,
               "peak_memory_gb": peak_memory_gb(job.device), "config": options,
               "calib": None if method == "rtn" else {
                   "spec": job.calib, "nsamples": job.nsamples, "seqlen": job.seqlen,
                   "seed": job.seed, "answer_loss": answers is not None},
               "kept_weights": sum(r["kept"] for r in results.values()),
               "circuit": None if masks is None else circuit_location(masks),
               "ckpt": job.ckpt or llama.DEFAULT_MODEL, "blocks": block_records(results)}
    print_summary(summary)
    if job.save or job.export:
        qconfig = {"quant_method": "mixq", "method": method, "bits": cfg.wbits,
                   "group_size": run_cfg.groupsize, "avg_bits": avg, "options": options,
                   "calib": summary["calib"]}
        if method == "resq":
            qconfig["resq"] = resq_config(model.args, run_cfg, results)
        source = llama.resolve_ckpt(job.ckpt) if job.ckpt else llama.embedded_checkpoint()
        save_and_export(model, results, source, qconfig, tok, job.save, job.export, job.drop_kept)
    if job.json_out:
        metrics.write_json(job.json_out, summary)
    return summary


def save_and_export(model, results, source, qconfig, tok, save, export, drop_kept):
    """--save, then --export of what was saved; an export alone converts a native checkpoint
    written to a temporary directory beside it."""
    if save:
        save_quantized(model, results, source, save, qconfig, tok)
        print(f"saved to {save}")
    if export and save:
        export_quantized(save, *export, drop_kept)
    elif export:
        parent = Path(export[1]).resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=parent, prefix=".mixq-native-") as tmp:
            save_quantized(model, results, source, Path(tmp) / "q", qconfig, tok)
            export_quantized(Path(tmp) / "q", *export, drop_kept)


def start_from_dequantized(model: llama.Transformer, ckpt) -> int:
    """A quantized --ckpt (mixq's, GPTQ, compressed-tensors): each quantized linear becomes an
    nn.Linear holding its dequantized weights, which the method then quantizes -> how many.
    A ResQ checkpoint (rotated, with quantized activations) is refused."""
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, kernels.ResQLinear):
            raise llama.CheckpointError(f"{ckpt}: a ResQ checkpoint (quantized activations); "
                                        "quantize its source checkpoint instead")
        if isinstance(module, kernels.QuantLinear):
            swaps.append((name, module))
    for name, q in swaps:
        lin = torch.nn.Linear(q.in_features, q.out_features, bias=False,
                              device=q.qweight.device, dtype=model.embed_tokens.weight.dtype)
        lin.weight.data = q.dequantized_weight().to(lin.weight)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)
    return len(swaps)


def check_finite_weights(model: llama.Transformer, ckpt):
    """Refuse a model with a NaN or an infinite weight, naming the tensors: every method would
    turn it into a NaN perplexity or a failed factorisation much later."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise llama.CheckpointError(f"{ckpt or llama.DEFAULT_MODEL}: non-finite weights (NaN or "
                                    f"Inf) in {', '.join(bad[:5])}"
                                    f"{' ...' if len(bad) > 5 else ''}")


def print_summary(s: dict):
    """A markdown row: method, bits, fp and quantized score per eval spec, time, memory."""
    def headline(r):  # ppl, acc or exact match
        k = next((k for k in ("ppl", "acc", "exact_match") if k in r), None)
        return f"{r[k]:.3f}" if k else "-"
    specs = list(s["fp"])
    kind = lambda m: "ppl" if "ppl" in m else "acc" if "acc" in m else "em"  # noqa: E731
    head = ["method", "avg W bits", "avg A bits"]
    head += [f"{sp} {kind(s['fp'][sp])} {which}" for sp in specs for which in ("fp", "quant")]
    head += ["quant s", "peak mem GB"]
    g = "per-channel" if s["groupsize"] == -1 else f"g{s['groupsize']}"
    row = [f"{s['method']} W{s['wbits']} {g}", f"{s['avg_bits']:.3f}", f"{s['act_bits']:.2f}"]
    row += [headline(s[which][sp]) for sp in specs for which in ("fp", "quant")]
    row += [f"{s['quant_seconds']:.0f}", f"{s['peak_memory_gb']:.1f}"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print("| " + " | ".join(row) + " |")


class Tee:
    """A stream that also writes to a file (--log): a long run a person can read afterwards."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        if not text.startswith("\r"):  # a progress line rewriting itself stays on the screen
            self.file.write(text)
            self.file.flush()
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):  # isatty, encoding, ...
        return getattr(self.stream, name)


def add_flags(parser, config_class):
    """One flag per field of a config dataclass that carries help (see `option`), with the
    field's default: the CLI and the Python API cannot differ."""
    for f in fields(config_class):
        if "help" not in f.metadata:
            continue
        kw = {k: v for k, v in f.metadata.items() if k != "flag"}
        if isinstance(f.default, bool):
            kw.setdefault("action", "store_true")
        elif f.default is not None and "nargs" not in kw:
            kw.setdefault("type", type(f.default))
        # a flag that turns an option off (--rounded) shows no default; unset, it is not passed
        default = argparse.SUPPRESS if kw.get("action") == "store_false" else f.default
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        parser.add_argument(flag, dest=f.name, default=default, **kw)


def cli_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Quantize a Llama checkpoint layer by layer and compare perplexity and task "
                    "accuracy. With no arguments: TaCQ, 3 bits per channel, ratio 0.0035, "
                    "calibrated on pydoc, on the embedded SmolLM2-135M-Instruct.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, Job)
    add_flags(p, QuantConfig)
    p.add_argument("--saved", default=None, help="with --export: convert this saved mixq "
                   "checkpoint and stop (no quantization)")
    p.add_argument("--log", default=None, help="append everything printed to this file too "
                   "(progress lines carry the time of day)")
    return p


def main():
    p = cli_parser()
    a = vars(p.parse_args())
    saved, log = a.pop("saved"), a.pop("log")
    if log:
        try:
            f = open(log, "a")
        except OSError as e:
            raise SystemExit(f"error: --log {log}: {e.strerror}")
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} python mixq.py {' '.join(sys.argv[1:])}\n")
        sys.stdout, sys.stderr = Tee(sys.stdout, f), Tee(sys.stderr, f)
    if a["evals"] == ["none"]:
        a["evals"] = []
    try:
        if saved:
            if not a["export"]:
                raise ValueError("--saved converts a checkpoint: give --export FORMAT DIR")
            export_quantized(saved, *a["export"], a["drop_kept"])
            return
        cfg = QuantConfig(**{f.name: a.pop(f.name) for f in fields(QuantConfig) if f.name in a})
        run(cfg, **a)
    except (llama.CheckpointError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
