"""Load a checkpoint and measure: load seconds, peak host memory (max RSS) against the checkpoint
size, prefill and decode tokens/s (after one short warm-up generation unless --warmup 0). Run it
once per implementation, each in a fresh process:

    python scripts/bench_load.py --ckpt checkpoints/random-llama3-8b --dtype bf16 [--device cuda]
    python scripts/bench_load.py --ckpt checkpoints/random-llama3-8b --dtype bf16 --impl transformers

(make the checkpoint with scripts/make_random_llama3_8b.py). transformers is only the yardstick.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
import model as llama  # noqa: E402


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@torch.no_grad()
def time_generation(forward, prompt_len, new_tokens, vocab, device):
    """forward(ids, step) -> next-token logits; returns prefill and decode tokens/s."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    x = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    sync()
    t0 = time.perf_counter()
    nxt = forward(x, 0).argmax(-1, keepdim=True)
    sync()
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(new_tokens):
        nxt = forward(nxt, prompt_len + i).argmax(-1, keepdim=True)
    sync()
    return prompt_len / prefill, new_tokens / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="checkpoints/random-llama3-8b")
    p.add_argument("--impl", default="mixq", choices=["mixq", "transformers"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="0: time the very first generation")
    p.add_argument("--static", action="store_true",
                   help="mixq: decode with static shapes, a CUDA graph on a GPU")
    a = p.parse_args()
    path = llama.resolve_ckpt(a.ckpt)
    t0 = time.perf_counter()
    if a.impl == "mixq":
        model, _ = llama.load(str(path), a.dtype, a.device)
        load_s = time.perf_counter() - t0
        model.setup_cache(1, a.prompt_len + a.new_tokens)
        step = model.static_decoder() if a.static else None

        def forward(ids, start):
            if step is not None and start > 0:  # a CUDA graph replay per token
                return step(ids, start)[:, -1]
            return model(ids, start_pos=start, last_only=True)[:, -1]
        vocab = model.args.vocab_size
    else:
        # transformers' model classes import Hugging Face's `kernels` package: from site-packages,
        # not our kernels.py (this script loads no packed checkpoint, model.py's only use of ours)
        sys.path.remove(ROOT)
        import transformers
        transformers.LlamaForCausalLM  # noqa: B018 (imports the model classes now)
        sys.path.insert(0, ROOT)
        dtype = llama.DTYPES[a.dtype]
        model = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                              device_map=a.device).eval()
        load_s = time.perf_counter() - t0
        cache = None

        def forward(ids, start):
            nonlocal cache
            if start == 0:  # a new sequence
                cache = transformers.DynamicCache(config=model.config)
            return model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        vocab = model.config.vocab_size
    if a.warmup:  # one short generation first: the GPU's first calls pick and load kernels
        time_generation(forward, a.prompt_len, 2, vocab, a.device)
    pre, dec = time_generation(forward, a.prompt_len, a.new_tokens, vocab, a.device)
    size = checkpoint_bytes(path)
    res = {"impl": a.impl, "ckpt": str(path), "device": a.device, "dtype": a.dtype,
           "load_s": load_s, "peak_rss_gb": peak_rss_gb(), "ckpt_gb": size / 2 ** 30,
           "peak_over_ckpt": peak_rss_gb() * 2 ** 30 / size,
           "prefill_tok_s": pre, "decode_tok_s": dec, "prompt_len": a.prompt_len,
           "new_tokens": a.new_tokens, "static": a.static}
    if a.device.startswith("cuda"):
        res["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(json.dumps(res))


if __name__ == "__main__":
    main()
