"""Write a random-weight checkpoint with Llama-3-8B's exact config, tensor names, bf16 dtype and
4 shards (split at ~5 GB like `save_pretrained`, so a layer straddles two shards as in the real
index). Quality numbers on it mean nothing; time and memory do.

    python scripts/make_random_llama3_8b.py [--out checkpoints/random-llama3-8b] [--layers 32]

Peak memory is one shard (~5 GB): each shard is generated, written and freed before the next.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

LLAMA3_8B = {  # meta-llama/Meta-Llama-3-8B config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}


def tensor_shapes(cfg):
    """HF names and shapes in the order save_pretrained writes them (embeddings, layers, norm, head)."""
    d, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    kv, ff = cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                (p + "mlp.gate_proj.weight", (ff, d)), (p + "mlp.up_proj.weight", (ff, d)),
                (p + "mlp.down_proj.weight", (d, ff)), (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (cfg["vocab_size"], d))]


def main():
    from safetensors.torch import save_file
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="checkpoints/random-llama3-8b")
    p.add_argument("--layers", type=int, default=32, help="fewer for a quick smaller variant")
    p.add_argument("--shard-gb", type=float, default=5.0, help="shard size, like save_pretrained")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = dict(LLAMA3_8B, num_hidden_layers=a.layers)
    shapes = tensor_shapes(cfg)
    # group tensors into shards of at most shard-gb (bf16: 2 bytes per element)
    limit, shards, cur, size = a.shard_gb * 1e9, [], [], 0
    for name, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if cur and size + nbytes > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    shards.append(cur)
    out = Path(a.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(a.seed)
    weight_map, total = {}, 0
    for s, group in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:  # N(0, 0.02^2) like the initializer, generated 1024 rows at a time in fp32
                t = torch.empty(shape, dtype=torch.bfloat16)
                for r in range(0, shape[0], 1024):
                    rows = t[r:r + 1024]
                    rows.copy_(torch.randn(rows.shape, generator=g) * 0.02)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        print(f"wrote {fname}: {len(group)} tensors", flush=True)
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"{out}: {len(shards)} shards, total_size {total:,} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
