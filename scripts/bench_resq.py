"""ResQ in integer arithmetic against fp on a CPU: each linear, then a whole saved model.

    python scripts/bench_resq.py linears    # Llama-3-8B's shapes, M = 1, 16, 256, 2048
    python scripts/bench_resq.py model      # the embedded model saved as W4A4KV4: prefill,
                                            # decode, checkpoint size, peak memory, KV cache
    python scripts/bench_resq.py all        [--threads N] [--repeats 3] [--resq DIR]

`linears`: kernels.ResQLinear (per-token activation codes, int8 x int8 -> int32 products by
torch._int_mm, scales once at the end) on random codes against F.linear in fp32 and in bf16, on
Llama-3-8B's q/o (4096 x 4096), gate/up (14336 x 4096) and down (4096 x 14336) weights: the
first two read their input as 3584 channels at 4 bits and 512 at 8 (W4A4 + W8A8, ResQ's 1/8
high slice), down_proj as 14336 at 4 bits. "int8 GEMM" is torch._int_mm alone on the same codes:
the rest of the integer column is quantizing the activations and the scales. Best of --repeats.
`model`: a W4A4KV4 ResQ checkpoint of the embedded model (--resq DIR, or made here: RTN weights
and 2 x 64 calibration tokens, which set the numbers but not the speed), loaded as a user loads
it, against the fp model, q/k/v and gate/up stacked in both (model.fuse_projections): a 512-token
prefill and 64 decoded tokens after a 128-token prompt (batch 1), each model in a process of its
own for its peak memory.
Threads: torch's default (every core) unless --threads.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import kernels  # noqa: E402
import model as llama  # noqa: E402

SHAPES = [("q/o", 4096, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]  # name, N, K


def best(fn, repeats: int) -> float:
    fn()  # warm-up (the integer linear unpacks its codes at the first call)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def random_resq_linear(N: int, K: int, high: int, gen) -> kernels.ResQLinear:
    """A ResQ linear of random codes: K - high input channels W4A4, the last `high` W8A8."""
    slices = [dict(width=K - high, bits=4, act_bits=4, group=K - high, zero_in_range=True)]
    if high:
        slices.append(dict(width=high, bits=8, act_bits=8, group=high, zero_in_range=True))
    t = {}
    for i, sl in enumerate(slices):
        t[f"qweight_{i}"] = kernels.pack(torch.randint(0, 2 ** sl["bits"], (sl["width"], N),
                                                       generator=gen), sl["bits"])
        t[f"scale_{i}"] = (torch.rand(N, generator=gen) * 0.01 + 0.001).half()
    return kernels.ResQLinear(K, N, slices, t)


@torch.no_grad()
def linears(a):
    gen = torch.Generator().manual_seed(0)
    print(f"Llama-3-8B linears, {torch.get_num_threads()} threads, best of {a.repeats}: ms per "
          "call, and the integer path's speed-up")
    print("| linear (N x K) | M | fp32 | bf16 | ResQ int | of which int8 GEMM | x fp32 | x bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, N, K in SHAPES:
        lin = random_resq_linear(N, K, 0 if name == "down" else K // 8, gen)
        W = lin.dequantized_weight()
        W16 = W.bfloat16()
        codes = lin.weight_codes()
        for M in (1, 16, 256, 2048):
            x = torch.randn(M, K, generator=gen)
            x16 = x.bfloat16()
            c = [torch.randint(-8, 8, (M, sl["width"]), dtype=torch.int8, generator=gen)
                 for sl in lin.slices]
            t32 = best(lambda: F.linear(x, W), a.repeats)
            t16 = best(lambda: F.linear(x16, W16), a.repeats)
            tq = best(lambda: lin(x), a.repeats)
            tmm = best(lambda: [torch._int_mm(ci, qi) for ci, qi in zip(c, codes)], a.repeats)
            print(f"| {name} {N} x {K} | {M} | {1e3 * t32:.2f} | {1e3 * t16:.2f} | "
                  f"{1e3 * tq:.2f} | {1e3 * tmm:.2f} | {t32 / tq:.2f} | {t16 / tq:.2f} |",
                  flush=True)


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def one_model(ckpt: str, repeats: int) -> dict:
    """Prefill and decode speed of one checkpoint, with this process's peak memory (VmHWM:
    getrusage's maxrss would count the parent's memory at the fork)."""
    model, tok = llama.load(ckpt)
    model.fuse_projections()  # q/k/v and gate/up as one linear each (both models)
    x = torch.randint(0, model.args.vocab_size, (1, 512),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefill = best(lambda: model(x), repeats)
    prompt = x[0, :128].tolist()
    decode = best(lambda: model.generate(prompt, 64, stop_ids=[]), repeats)
    t0 = time.perf_counter()
    model.generate(prompt, 1, stop_ids=[])  # the prompt alone, to take it out of decode
    decode = (decode - (time.perf_counter() - t0)) / 63
    model.setup_cache(1, 2048)
    cache = model.layers[0].self_attn.cache
    per_layer = sum(b.numel() * b.element_size() for b in cache.buffers()) / 2048
    return {"prefill_tps": 512 / prefill, "decode_tps": 1 / decode,
            "peak_rss_gb": peak_rss_gb(),
            "kv_bytes_per_token": per_layer * model.args.n_layers,
            "kv_cache_type": type(cache).__name__}


def model_part(a):
    with tempfile.TemporaryDirectory() as tmp:
        resq = a.resq
        if resq is None:
            resq = str(Path(tmp) / "resq")
            import mixq
            mixq.run(method="resq", cfg=mixq.QuantConfig(wbits=4, w_rtn=True), nsamples=2,
                     seqlen=64, evals=(), save=resq)
        fp = str(llama.embedded_checkpoint())
        rows = {}
        for name, ckpt in (("fp32", fp), ("ResQ W4A4KV4", resq)):
            out = subprocess.run([sys.executable, __file__, "one", "--ckpt", ckpt, "--repeats",
                                  str(a.repeats)] + (["--threads", str(a.threads)]
                                                     if a.threads else []),
                                 capture_output=True, text=True, check=True)
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
            rows[name]["size_mb"] = sum(f.stat().st_size for f in Path(ckpt).glob(
                "*.safetensors")) / 2 ** 20
    print(f"\nThe embedded model, {a.threads or torch.get_num_threads()} threads, best of "
          f"{a.repeats}: prefill 512 tokens, decode 64 after a 128-token prompt (batch 1)")
    print("| model | prefill tokens/s | decode tokens/s | weights MB | peak RSS GB | KV cache "
          "bytes/token |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {r['size_mb']:.0f} | "
              f"{r['peak_rss_gb']:.2f} | {r['kv_bytes_per_token']:,.0f} ({r['kv_cache_type']}) |")
    fp, q = rows["fp32"], rows["ResQ W4A4KV4"]
    print(f"ResQ / fp32: prefill {q['prefill_tps'] / fp['prefill_tps']:.2f}x, decode "
          f"{q['decode_tps'] / fp['decode_tps']:.2f}x; KV cache {q['kv_bytes_per_token']:,.0f} "
          f"bytes per token against {fp['kv_bytes_per_token'] / 2:,.0f} in fp16 "
          f"({fp['kv_bytes_per_token'] / 2 / q['kv_bytes_per_token']:.2f}x smaller)")


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__)
    p.add_argument("part", choices=["linears", "model", "all", "one"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resq", default=None, help="a saved ResQ checkpoint (default: make one)")
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)  # for `one`
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.part == "one":
        print(json.dumps(one_model(a.ckpt, a.repeats)))
    if a.part in ("linears", "all"):
        linears(a)
    if a.part in ("model", "all"):
        model_part(a)


if __name__ == "__main__":
    main()
