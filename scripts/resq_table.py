"""The ResQ table: fp, RTN W4A4KV4 (no rotation), QuaRot-style W4A4KV4 (random rotations, no
high slice), ResQ W4A4KV4, W4A16KV16 and W4A16KV4, perplexity on the pydoc evaluation split.

    python scripts/resq_table.py [--nsamples 32] [--runs rtn quarot resq resq-w4a16 resq-w4a16kv4]
    python scripts/resq_table.py --energy   # the residual basis, norms folded before or after

Calibration: --nsamples windows of 512 tokens from the pydoc calibration split (seed 0), used for
the bases and for GPTQ.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as metrics  # noqa: E402
import mixq  # noqa: E402
import model as llama  # noqa: E402

RUNS = {  # name -> ResQ options (W4, per channel, symmetric, MSE clipping)
    "rtn": dict(rotation="none", w_rtn=True, abits=4, kvbits=4),
    "quarot": dict(rotation="random", abits=4, kvbits=4),
    "resq": dict(rotation="pca", abits=4, kvbits=4),
    "resq-w4a16": dict(rotation="pca", abits=16, kvbits=16),
    "resq-w4a16kv4": dict(rotation="pca", abits=16, kvbits=4),
}


def energy_shares(model, calib, high_fraction=0.125):
    """The share of the quantized activations' energy (the inputs of q/k/v and gate/up after the
    norms are folded) that the top high_fraction slice of the residual basis holds, for the
    basis from those activations and for one from the activations before folding (g * x/rms)."""
    before = mixq.resq_covariances(model, calib)["resid"]
    mixq.fold_norms(model)
    after = mixq.resq_covariances(model, calib)["resid"]  # what gets quantized
    r = int(high_fraction * after.shape[0])
    for name, cov in (("norms folded first (ResQ's code)", after), ("norms folded after", before)):
        P = mixq.pca_basis(cov)[:, -r:]  # the high slice
        share = torch.trace(P.T @ after @ P) / torch.trace(after)
        print(f"basis from the activations with {name}: top 1/8 holds {100 * share:.1f}% of "
              "the quantized activations' energy")


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--energy", action="store_true", help="only compare the two residual bases")
    a = p.parse_args()
    model, tok = llama.load()
    if a.energy:
        return energy_shares(model, mixq.calibration_windows("pydoc", tok, a.nsamples, 512, seed=0))
    ev = metrics.corpus_tokens("pydoc", tok, "eval")
    fp = metrics.perplexity(model, ev, 512)
    calib = mixq.calibration_windows("pydoc", tok, a.nsamples, 512, seed=0)
    print(metrics.protocol("pydoc", "eval", 512, fp["windows"], fp["tokens"]))
    print("| run | W bits | A bits | KV bits | ppl | seconds | peak RSS GB |\n"
          "|---|---|---|---|---|---|---|")
    print(f"| fp | 16 | 16 | 16 | {fp['ppl']:.2f} | - | - |", flush=True)
    for name in a.runs:
        cfg = mixq.method_config("resq", mixq.QuantConfig(wbits=4, **RUNS[name]))
        model, _ = llama.load()
        t0 = time.perf_counter()
        mixq.resq_prepare(model, calib, cfg, log=lambda s: None)
        res = mixq.quantize_model(model, calib, "resq", cfg, log=lambda s: None)
        mixq.install_resq_quantizers(model, cfg)
        secs = time.perf_counter() - t0
        ppl = metrics.perplexity(model, ev, 512)["ppl"]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(f"| {name} | {mixq.average_bits(res):.3f} | {mixq.activation_bits(model.args, cfg):.2f} "
              f"| {cfg.kvbits} | {ppl:.2f} | {secs:.0f} | {rss:.1f} |", flush=True)


if __name__ == "__main__":
    main()
