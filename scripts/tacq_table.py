"""The TaCQ table: GPTQ, SpQR-style and TaCQ (calibrated on text or on a task) at a few bit widths,
with perplexity and task accuracy.

    python scripts/tacq_table.py --configs W3 W3g64 --runs gptq spqr tacq:pydoc tacq:task:capitals
    python scripts/tacq_table.py --configs W2 --runs tacq:pydoc --ratios 0.0035 0.01 0.03

A run is `gptq`, `spqr`, `tacq:CALIB` (CALIB: pydoc or a task spec; on a task, TaCQ's protocol:
one item per sample, the loss on every position) or `tacq-answers:TASK` (mixq's --answer-loss:
items packed into windows, the loss on the answers only). GPTQ uses TaCQ's grid (asymmetric,
MSE clipping) so the two differ only in the mask. SpQR-style runs at about TaCQ's average bits:
groups of 64 against per-channel TaCQ, groups of 16 against TaCQ with groups. Every run
calibrates on --nsamples windows of 512 tokens (task calibration: items up to that many tokens),
seed 0. Scores are cached per (config, calibration) in --scores-dir, so each extra ratio costs
only the final GPTQ.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as metrics  # noqa: E402
import mixq  # noqa: E402
import model as llama  # noqa: E402


def parse_config(name: str) -> dict:
    bits, _, g = name[1:].partition("g")
    return {"wbits": int(bits), "groupsize": int(g) if g else -1}


def evaluate(model, tok, specs):
    out = {}
    for spec in specs:
        if metrics.is_task(spec):
            r = metrics.task_accuracy(model, tok, spec)
            out[spec] = r.get("acc", r.get("exact_match"))
        else:
            out[spec] = metrics.perplexity(model, metrics.corpus_tokens(spec, tok, "eval"), 512)["ppl"]
    return out


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["W3", "W3g64"])
    p.add_argument("--runs", nargs="+", default=["gptq", "spqr", "tacq:pydoc",
                                                  "tacq:task:capitals"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.0035])
    p.add_argument("--evals", nargs="+", default=["pydoc", "task:capitals", "task:compare",
                                                  "task:arith"])
    p.add_argument("--spqr-threshold", type=float, default=0.2)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--scores-dir", default="out/tacq-scores")
    a = p.parse_args()
    model, tok = llama.load()
    fp = evaluate(model, tok, a.evals)
    cols = " | ".join(a.evals)
    header = f"| config | run | ratio | avg bits | {cols} | seconds |\n" + \
        "|---" * (5 + len(a.evals)) + "|"
    print(header)
    print("| fp | - | - | 16 | " + " | ".join(f"{fp[s]:.3f}" for s in a.evals) + " | - |",
          flush=True)
    circuits = []  # where each TaCQ run's 16-bit weights are
    for conf in a.configs:
        for run in a.runs:
            method, _, calib = run.partition(":")
            calib = calib or "pydoc"
            ratios = a.ratios if method.startswith("tacq") else [None]
            for ratio in ratios:
                cfg = mixq.QuantConfig(**parse_config(conf), mse=True, ratio=ratio or 0.0)
                if method == "spqr":  # matched bits: per-channel TaCQ (~3.16 at W3) against
                    # SpQR-style g64 (3.16 + outliers); TaCQ g64 (3.61) against g16 (3.63 + ...)
                    c = parse_config(conf)
                    c["groupsize"] = 64 if c["groupsize"] == -1 else 16
                    cfg = mixq.spqr_config(mixq.QuantConfig(**c, outlier_threshold=a.spqr_threshold))
                model, _ = llama.load()
                answer_loss = method == "tacq-answers"
                data, answers = mixq.calibration_data(calib, tok, a.nsamples, 512, 0, answer_loss)
                t0 = time.perf_counter()
                masks = None
                if method.startswith("tacq"):
                    fingerprint = {"config": conf, "calib": calib, "nsamples": a.nsamples}
                    name = f"{conf}-{calib.replace(':', '-')}"
                    if metrics.is_task(calib):  # the two protocols' scores
                        fingerprint["answer_loss"] = answer_loss
                        name += "-answers" if answer_loss else "-items"
                    d = Path(a.scores_dir) / name
                    scores = mixq.cached_tacq_scores(model, data, answers, cfg, fingerprint, d,
                                                  log=lambda s: None)
                    masks = mixq.global_top_k_masks(scores, ratio)
                    circuits.append((f"{conf} {run} ratio {ratio}", mixq.circuit_location(masks)))
                res = mixq.quantize_model(model, data, "gptq", cfg, log=lambda s: None,
                                       masks=masks)
                secs = time.perf_counter() - t0
                r = evaluate(model, tok, a.evals)
                print(f"| {conf} | {run} | {ratio if ratio is not None else '-'} | "
                      f"{mixq.average_bits(res):.3f} | " + " | ".join(f"{r[s]:.3f}" for s in a.evals)
                      + f" | {secs:.0f} |", flush=True)
    for title, where in circuits:
        print(f"\nTaCQ {title}: where the 16-bit weights are")
        mixq.print_circuit(where)


if __name__ == "__main__":
    main()
