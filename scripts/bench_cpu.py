"""mixq on a CPU: how long each solver and each method takes, idle and beside a busy program,
and how fast a quantized checkpoint generates next to the fp model.

    python scripts/bench_cpu.py solvers            # each solver on each matrix shape, idle / busy
    python scripts/bench_cpu.py methods            # each method on the embedded model (32 x 512)
    python scripts/bench_cpu.py generate           # decode tokens/s: fp and saved checkpoints
    python scripts/bench_cpu.py tacq               # the default job's parts, one at a time
    python scripts/bench_cpu.py sigma              # one sample's update of X X^T / N
    python scripts/bench_cpu.py evaluate           # the default job's evaluation, part by part
    python scripts/bench_cpu.py all

`solvers` times every solver on a random W (m, n) with H from 4096 random inputs, for the
embedded model's shapes and Llama-3-8B's (rows cut to --rows-8b: a solver's cost per column
grows with the rows, its number of steps with the columns, which stay). "busy" runs the same
call while another process spins on one core, as on a laptop or a shared server. QuantEase runs
--qe-sweeps sweeps here (30 in a real run: the time per sweep is the same).
`methods` quantizes the embedded model with each method on 32 windows of 512 pydoc tokens
(no evaluation) and prints the seconds of quantization. `generate` measures decode tokens/s
(batch 1, a 128-token prompt, 64 new tokens, best of 3) of the fp model and of checkpoints saved
by mixq, loaded as a user loads them, one after the other in this process. `tacq` times the
parts of the default job that run most: the gradient pass on --tacq-samples windows of 512
tokens, each block run again in its backward and with its graph kept from the forward (the G of
both compared bit for bit), and the GPTQ solves of one block's seven matrices, without and with
a TaCQ mask (W3 per channel, MSE grid; random inputs); the best of --repeats runs; and the
machine's fp32 matrix-product rate on the model's shapes. It also runs
against an older checkout of mixq (copy this file into its scripts/), which has no kept graphs.
`sigma` times one 512-token sample's update of a linear's Sigma = X X^T / N, written out plainly
and as mixq.InputStats.add does it (the upper triangle only), and checks that both give the
same Sigma bit for bit.
`evaluate` times the default job's evaluation of the embedded model, part by part: pydoc
perplexity (22 windows of 512) and each multiple-choice task scored one item per forward
(max_tokens=1) and with the items of the same padded length together (the default), with the
scores of both compared bit for bit.
Threads: torch's default (every core) unless --threads.
"""

import argparse
import inspect
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as metrics  # noqa: E402
import mixq  # noqa: E402
import model as llama  # noqa: E402

EMBEDDED_SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576),
                   "down": (576, 1536)}
LLAMA3_8B_SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096),
                    "down": (4096, 14336)}


class BusyCore:
    """Another process spinning on one core while the block runs."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # let it start
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def solvers(qe_sweeps: int):
    """name -> function(W, H) for every solver, W3 with groups of 64 unless said."""
    g64 = mixq.QuantConfig(wbits=3, groupsize=64)
    return {
        "rtn W3 g64 (mse)": lambda W, H: mixq.rtn(W, mixq.QuantConfig(wbits=3, groupsize=64,
                                                                      mse=True)),
        "gptq W3 g64": lambda W, H: mixq.gptq(W, H, g64),
        "gptq W3 per channel (mse)": lambda W, H: mixq.gptq(W, H, mixq.QuantConfig(wbits=3,
                                                                                mse=True)),
        "gptq W3 act-order": lambda W, H: mixq.gptq(W, H, mixq.QuantConfig(act_order=True)),
        "spqr-style W3 g16": lambda W, H: mixq.gptq(W, H, mixq.spqr_config(
            mixq.QuantConfig(wbits=3, outlier_threshold=0.2))),
        f"quantease W3 g64 ({qe_sweeps} sweeps)":
            lambda W, H: mixq.quantease(W, H / 2, mixq.QuantConfig(wbits=3, groupsize=64,
                                                                   iters=qe_sweeps)),
        f"quantease 1% outliers ({qe_sweeps} sweeps)":
            lambda W, H: mixq.quantease_outliers(W, H / 2, mixq.QuantConfig(
                wbits=3, groupsize=64, iters=qe_sweeps, outliers=0.01)),
    }


def timed(fn, *args) -> float:
    """Seconds of one call on one torch thread, as the pipeline runs a solve (mixq.solve_group);
    for a call under a second, the best of three (a single tenth of a second is mostly noise)."""
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        with mixq.one_thread():
            fn(*args)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
        if best >= 1:
            break
    return best


def bench_solvers(a):
    shapes = []
    if "smollm2" in a.models:
        shapes += [("SmolLM2-135M " + k, m, n) for k, (m, n) in EMBEDDED_SHAPES.items()
                   if k in a.shapes]
    if "llama3-8b" in a.models:
        shapes += [("Llama-3-8B " + k, min(m, a.rows_8b), n)
                   for k, (m, n) in LLAMA3_8B_SHAPES.items() if k in a.shapes]
    print(f"\nsolvers, {torch.get_num_threads()} threads; busy = beside one spinning process")
    print("| shape | W (m x n) | solver | idle s | busy s | busy / idle |")
    print("|---|---|---|---|---|---|")
    for name, m, n in shapes:
        g = torch.Generator().manual_seed(0)
        X = torch.randn(4096, n, generator=g) * torch.rand(n, generator=g)  # uneven channels
        H = 2 * X.T @ X / X.shape[0]  # H = 2 X X^T / N
        W = torch.randn(m, n, generator=g) / n ** 0.5
        for solver, fn in solvers(a.qe_sweeps).items():
            if solver.startswith("quantease") and n > 4096 and not a.qe_large:
                continue  # minutes per sweep on a CPU at n = 14336; --qe-large to include
            idle = timed(fn, W, H)
            with BusyCore():
                busy = timed(fn, W, H)
            print(f"| {name} | {m} x {n} | {solver} | {idle:.2f} | {busy:.2f} | "
                  f"{busy / idle:.1f}x |", flush=True)


def bench_methods(a):
    model, tok = llama.load()
    calib, answers = mixq.calibration_data("pydoc", tok, 32, 512, 0)
    runs = {"rtn": "rtn W3 g64", "gptq": "gptq W3 g64", "spqr": "spqr-style W3 g16",
            "quantease": "quantease W3 g64 (30 sweeps)", "tacq": "tacq W3 (the default job)",
            "resq": "resq W4A4KV4"}
    print(f"\nmethods on {llama.DEFAULT_MODEL}, 32 x 512 pydoc tokens, "
          f"{torch.get_num_threads()} threads")
    print("| method | seconds to quantize |")
    print("|---|---|")
    for method in a.methods:
        model, _ = llama.load()
        cfg = mixq.QuantConfig(wbits=4 if method == "resq" else 3,
                               groupsize=-1 if method in ("tacq", "resq") else 64)
        cfg = mixq.method_config(method, cfg)
        quiet = (lambda s: None)
        t0 = time.perf_counter()
        if method == "tacq":
            mixq.tacq(model, calib, answers, cfg, log=quiet)
        elif method == "resq":
            mixq.resq(model, calib, cfg, log=quiet)
        else:
            mixq.quantize_model(model, None if method == "rtn" else calib, method, cfg, log=quiet)
        print(f"| {runs.get(method, method)} | {time.perf_counter() - t0:.0f} |", flush=True)


def best_of(repeats: int, fn):
    """(the fastest of `repeats` calls in seconds, the last call's result)"""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_tacq(a):
    model, tok = llama.load()
    calib = mixq.calibration_windows("pydoc", tok, a.tacq_samples, 512, 0)
    print(f"\nTaCQ's parts on {llama.DEFAULT_MODEL}, {torch.get_num_threads()} threads, best of "
          f"{a.repeats}")
    print("| part | seconds |")
    print("|---|---|")
    modes = [False, True] if "keep_graphs" in inspect.signature(
        mixq.gradient_magnitudes).parameters else [None]
    G = {}
    for keep in modes:
        kw = {} if keep is None else {"keep_graphs": keep}
        dt, G[keep] = best_of(a.repeats, lambda: mixq.gradient_magnitudes(
            model, calib, log=lambda s: None, **kw))
        how = {None: "", False: ", each block run again", True: ", graphs kept"}[keep]
        print(f"| gradient pass, {a.tacq_samples} x 512 tokens{how} | {dt:.1f} |", flush=True)
    if len(modes) == 2:
        same = all(torch.equal(G[False][k], G[True][k]) for k in G[False])
        print(f"(the two gradient passes give the same G bit for bit: {same})")
    rates = []  # the machine's fp32 matrix-product rate on the model's shapes, for 512 tokens
    for k, n in ((model.args.dim, model.args.hidden_dim), (model.args.hidden_dim, model.args.dim),
                 (model.args.dim, model.args.vocab_size)):
        x, w = torch.randn(512, k), torch.randn(n, k)
        dt, _ = best_of(5, lambda: x @ w.T)
        rates.append(f"512 x {k} @ {k} x {n}: {2 * 512 * k * n / dt / 1e9:.0f}")
    print("(fp32 matrix products, GFLOP/s: " + ", ".join(rates) + ")")
    cfg = mixq.method_config("tacq", mixq.QuantConfig(wbits=3))
    g = torch.Generator().manual_seed(0)
    groups = []  # block 5's weights in the pipeline's groups, inputs with uneven channel scales
    for group in mixq.SEQUENTIAL:
        X = None
        groups.append([])
        for name in group:
            W = model.layers[5].get_submodule(name).weight.data
            if X is None:  # one input for the group, as in the pipeline
                X = torch.randn(2048, W.shape[1], generator=g) * torch.rand(W.shape[1],
                                                                           generator=g)
            groups[-1].append((W, X.T @ X / 2048, torch.rand(W.shape, generator=g) < 0.0035))
    for label, masked in (("reference GPTQ", False), ("GPTQ with a 0.35% mask", True)):
        dt, _ = best_of(a.repeats, lambda: [mixq.solve_group(
            [("tacq", W, S, cfg, M if masked else None, None) for W, S, M in group], "cpu")
            for group in groups])
        print(f"| {label}: one block's 7 solves as the pipeline runs them, W3 per channel, MSE grid | {dt:.2f} |",
              flush=True)


def bench_sigma(a):
    """One 512-token sample's update of Sigma = X X^T / N (four samples in a row, the last three
    timed): the plain x.T @ x against InputStats.add, at the embedded model's widths and 4096."""
    print("\nSigma's update for one 512-token sample, ms (the mean of three)")
    print("| width | plain: Sigma * N / (N + t) + x^T x / (N + t) | InputStats.add | same Sigma |")
    print("|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n in (576, 1536, 4096):
        xs = [torch.randn(1, 512, n, generator=g) * torch.rand(n, generator=g) for _ in range(4)]
        plain, stats, count, seconds = torch.zeros(n, n), mixq.InputStats(n, "cpu"), 0, [0, 0]
        for i, x in enumerate(xs):
            t0 = time.perf_counter()
            plain.mul_(count / (count + 512)).add_(x[0].T @ x[0] / (count + 512))
            t1 = time.perf_counter()
            stats.add(x)
            t2 = time.perf_counter()
            count += 512
            if i:
                seconds[0] += (t1 - t0) / 3
                seconds[1] += (t2 - t1) / 3
        print(f"| {n} | {seconds[0] * 1e3:.1f} | {seconds[1] * 1e3:.1f} | "
              f"{torch.equal(plain, stats.sigma)} |", flush=True)


def bench_evaluate(a):
    model, tok = llama.load()
    print(f"\nthe default job's evaluation of {llama.DEFAULT_MODEL}, seconds, "
          f"{torch.get_num_threads()} threads, best of {a.repeats}")
    print("| part | one item per forward | items of one length together | largest score change |")
    print("|---|---|---|---|")
    dt, _ = best_of(a.repeats, lambda: metrics.perplexity(
        model, metrics.corpus_tokens("pydoc", tok, "eval"), 512))
    print(f"| pydoc perplexity, 22 windows of 512 | {dt:.1f} | | |", flush=True)
    for name in ("capitals", "compare"):
        task = metrics.load_task(f"task:{name}", "eval")
        items = [(metrics.prompt(task, it), [" " + c for c in it["choices"]]) for it in task.items]
        dt1, alone = best_of(a.repeats, lambda: metrics.continuation_logprobs(
            model, tok, items, max_tokens=1))
        dt2, together = best_of(a.repeats, lambda: metrics.continuation_logprobs(model, tok, items))
        change = max(abs(x - y) for xs, ys in zip(alone, together) for x, y in zip(xs, ys))
        print(f"| task:{name}, {len(items)} items | {dt1:.1f} | {dt2:.1f} | {change:.1e} |",
              flush=True)


def decode_speed(model) -> float:
    return metrics.speed(model, prompt_len=128, new_tokens=64)["decode_tokens_per_s"]


def bench_generate(a):
    model, tok = llama.load()
    rows = [("fp32 (the embedded model)", decode_speed(model))]
    with tempfile.TemporaryDirectory() as tmp:
        for conf in a.checkpoints:
            bits, _, g = conf[1:].partition("g")
            cfg = mixq.QuantConfig(wbits=int(bits), groupsize=int(g) if g else -1)
            model, _ = llama.load()
            results = mixq.quantize_model(model, None, "rtn", cfg, log=lambda s: None)
            out = Path(tmp) / conf
            mixq.save_quantized(model, results, llama.embedded_checkpoint(), out,
                                {"quant_method": "mixq", "method": "rtn", "bits": cfg.wbits,
                                 "group_size": cfg.groupsize, "modules": sorted(results)})
            qmodel, _ = llama.load(str(out))
            rows.append((f"{conf} RTN, saved and loaded", decode_speed(qmodel)))
    print(f"\ndecode, batch 1, 128-token prompt, 64 new tokens, {torch.get_num_threads()} threads")
    print("| model | tokens/s | vs fp |")
    print("|---|---|---|")
    for name, tps in rows:
        print(f"| {name} | {tps:.1f} | {tps / rows[0][1]:.2f}x |")


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("part", choices=["solvers", "methods", "generate", "tacq", "sigma", "evaluate",
                                    "all"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--models", nargs="+", default=["smollm2", "llama3-8b"],
                   help="whose matrix shapes `solvers` runs")
    p.add_argument("--rows-8b", type=int, default=1024, help="rows of the Llama-3-8B shapes")
    p.add_argument("--shapes", nargs="+", default=list(EMBEDDED_SHAPES),
                   choices=list(EMBEDDED_SHAPES), help="which matrices `solvers` runs")
    p.add_argument("--qe-sweeps", type=int, default=3, help="QuantEase sweeps in `solvers`")
    p.add_argument("--qe-large", action="store_true", help="QuantEase on n = 14336 too")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "spqr", "quantease", "tacq",
                                                    "resq"])
    p.add_argument("--checkpoints", nargs="+", default=["W4g32", "W4g64", "W3g64", "W2g64"],
                   help="RTN checkpoints for `generate`")
    p.add_argument("--tacq-samples", type=int, default=8, help="windows for `tacq`'s gradients")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each part of `tacq` and `evaluate`")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.part in ("solvers", "all"):
        bench_solvers(a)
    if a.part in ("methods", "all"):
        bench_methods(a)
    if a.part in ("generate", "all"):
        bench_generate(a)
    if a.part in ("tacq", "all"):
        bench_tacq(a)
    if a.part in ("sigma", "all"):
        bench_sigma(a)
    if a.part in ("evaluate", "all"):
        bench_evaluate(a)


if __name__ == "__main__":
    main()
