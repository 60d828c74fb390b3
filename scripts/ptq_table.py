"""The quantization-core table: every method at several bit widths on one checkpoint.

    python scripts/ptq_table.py [--ckpt X] [--nsamples 32] [--configs W4g64 W3g64 W2g64 W3]
                                [--methods rtn gptq gptq-act gptq-act-static gptq-static
                                           quantease quantease-rounded quantease-act
                                           quantease-act-static quantease-1% spqr]
                                [--json results.json]

Calibration: --nsamples random windows of 512 tokens from the pydoc calibration split (seed 0),
the same windows for every run. Perplexity: the pydoc evaluation split, seqlen 512 (eval.py).
Prints one markdown row per run as it finishes, then the whole table.
"""

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as metrics  # noqa: E402
import mixq  # noqa: E402
import model as llama  # noqa: E402

METHODS = {  # name -> (mixq method, option overrides)
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "gptq-act": ("gptq", {"act_order": True}),  # dynamic groups, the reference's default
    "gptq-act-static": ("gptq", {"act_order": True, "static_groups": True}),
    "gptq-static": ("gptq", {"static_groups": True}),
    "quantease": ("quantease", {}),  # the released code's schedule: 30 sweeps, some unrounded
    "quantease-rounded": ("quantease", {"iters": 10, "relaxed": False}),  # 10 rounded sweeps
    "quantease-act": ("quantease", {"act_order": True}),  # groups along the sweep order
    "quantease-act-static": ("quantease", {"act_order": True, "static_groups": True}),
    "quantease-1%": ("quantease", {"iters": 10, "outliers": 0.01}),
    "spqr": ("spqr", {}),
}


def parse_config(name: str) -> dict:
    """W3g64 -> wbits 3, groupsize 64; W3 -> per-channel."""
    bits, _, g = name[1:].partition("g")
    return {"wbits": int(bits), "groupsize": int(g) if g else -1}


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--configs", nargs="+", default=["W4g64", "W3g64", "W2g64", "W3"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    model, tok = llama.load(a.ckpt)
    ev = metrics.corpus_tokens("pydoc", tok, "eval")
    fp = metrics.perplexity(model, ev, 512)
    calib = mixq.calibration_windows("pydoc", tok, a.nsamples, a.seqlen, seed=0)
    print(f"{metrics.protocol('pydoc', 'eval', 512, fp['windows'], fp['tokens'])}; calibration "
          f"{a.nsamples} x {a.seqlen} pydoc calib-split windows, seed 0")
    print(f"fp ppl {fp['ppl']:.3f}\n")
    header = "| config | method | avg bits | ppl | quant seconds |\n|---|---|---|---|---|"
    print(header, flush=True)
    rows, out = [], []
    for conf in a.configs:
        for name in a.methods:
            method, over = METHODS[name]
            cfg = mixq.QuantConfig(**parse_config(conf), **over)
            model, _ = llama.load(a.ckpt)
            t0 = time.perf_counter()
            res = mixq.quantize_model(model, None if method == "rtn" else calib, method, cfg,
                                   log=lambda s: None)
            secs = time.perf_counter() - t0
            ppl = metrics.perplexity(model, ev, 512)["ppl"]
            row = f"| {conf} | {name} | {mixq.average_bits(res):.3f} | {ppl:.2f} | {secs:.0f} |"
            print(row, flush=True)
            rows.append(row)
            out.append({"config": conf, "method": name, "avg_bits": mixq.average_bits(res),
                        "ppl": ppl if math.isfinite(ppl) else str(ppl), "seconds": secs})
    print(f"\nfp ppl {fp['ppl']:.3f}\n{header}\n" + "\n".join(rows))
    if a.json:
        metrics.write_json(a.json, {"fp_ppl": fp["ppl"], "nsamples": a.nsamples, "runs": out})


if __name__ == "__main__":
    main()
