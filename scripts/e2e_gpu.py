"""End to end on a GPU: the embedded SmolLM2 quantized (GPTQ, 3 and 4 bits, groups of 64, plus
0.35% random 16-bit outliers so the CSR kernel runs too), its linears swapped for
kernels.QuantLinear, then greedy text and perplexity through the Triton kernels and through the
torch path (MIXQ_TORCH_PATH=1) compared.

    python scripts/e2e_gpu.py [--ckpt PATH.gguf] [--dtype fp16]

Without a GPU, the same comparison with the kernels run by Triton's interpreter (slow: a few
tokens and one window):

    TRITON_INTERPRET=1 python scripts/e2e_gpu.py --device cpu --interpret --new-tokens 8 \
        --windows 1 --nsamples 2
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as metrics  # noqa: E402
import kernels  # noqa: E402
import mixq  # noqa: E402
import model as llama  # noqa: E402


def swap_in_quant_linears(model, results, groupsize):
    """Replace each quantized nn.Linear by a QuantLinear over its packed tensors (what
    model.load_quantized does for a saved checkpoint)."""
    for name, r in results.items():
        lin = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        parts = {k: v.to(lin.weight.device) for k, v in r["tensors"].items()}
        setattr(model.get_submodule(parent), child, kernels.QuantLinear(
            lin.in_features, lin.out_features, r["bits"], groupsize, parts))


def both_paths(fn):
    """fn() through the Triton kernels, then through the torch path."""
    via_kernel = fn()
    os.environ["MIXQ_TORCH_PATH"] = "1"
    try:
        return via_kernel, fn()
    finally:
        del os.environ["MIXQ_TORCH_PATH"]


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None, help="default: the embedded SmolLM2")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--windows", type=int, default=8, help="eval windows of 512 tokens")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows of 512 tokens")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    p.add_argument("--interpret", action="store_true",
                   help="on a CPU, run the kernels under TRITON_INTERPRET=1 (set it too)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    a = p.parse_args()
    if a.interpret and not os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("error: --interpret needs TRITON_INTERPRET=1 in the environment")
    on_device = kernels.use_triton
    for bits in a.bits:
        kernels.use_triton = on_device  # quantize with the torch solvers on a CPU
        model, tok = llama.load(a.ckpt, a.dtype, a.device)
        prompt = tok.encode(tok.chat_prompt("Write a short paragraph about the ocean."))
        calib = mixq.calibration_windows("pydoc", tok, a.nsamples, 512, 0)
        cfg = mixq.QuantConfig(wbits=bits, groupsize=64)
        g = torch.Generator().manual_seed(0)
        masks = {f"layers.{i}.{n}": torch.rand(lin.weight.shape, generator=g) < 0.0035
                 for i, blk in enumerate(model.layers) for n, lin in blk.named_modules()
                 if isinstance(lin, torch.nn.Linear)}
        res = mixq.quantize_model(model, calib, "gptq", cfg, a.device, log=lambda s: None,
                               masks=masks)
        swap_in_quant_linears(model, res, cfg.groupsize)
        if a.interpret:  # QuantLinear through the kernels (interpreted), but MIXQ_TORCH_PATH
            kernels.use_triton = lambda x: not os.environ.get("MIXQ_TORCH_PATH")
        ids_k, ids_t = both_paths(lambda: model.generate(prompt, a.new_tokens))
        same = next((i for i, (u, v) in enumerate(zip(ids_k, ids_t)) if u != v),
                    min(len(ids_k), len(ids_t)))
        toks = metrics.corpus_tokens("pydoc", tok, "eval")
        ppl_k, ppl_t = both_paths(lambda: metrics.perplexity(model, toks, 512, a.windows)["ppl"])
        print(f"W{bits} g64 GPTQ + 0.35% outliers, {a.dtype} on {a.device}:"
              f" greedy tokens equal for {same} of {len(ids_k)} (kernel) / {len(ids_t)} (torch);"
              f" pydoc eval ppl ({a.windows} x 512) kernel {ppl_k:.4f}, torch {ppl_t:.4f}")
        print("  kernel:", repr(tok.decode(ids_k)))
        print("  torch: ", repr(tok.decode(ids_t)))


if __name__ == "__main__":
    main()
