"""Quantization cost at 8B scale: wall time, peak GPU and host memory, average bits per method,
each method in a fresh subprocess (so the peaks are its own); also resume-after-kill and decode
speed. Made for the random-weight Llama-3-8B (scripts/make_random_llama3_8b.py): quality numbers
on it mean nothing, time and memory do. Calibration: random token ids (seed 0), no tokenizer.

    python scripts/bench_8b.py --ckpt checkpoints/random-llama3-8b --device cuda \
        --methods rtn gptq quantease spqr --nsamples 128 --seqlen 2048 [--layers 4] [--json OUT]
    python scripts/bench_8b.py --ckpt checkpoints/random-llama3-8b --device cuda \
        --resume-check --layers 4 --nsamples 8      # GPTQ killed after block 2, then resumed
    python scripts/bench_8b.py --ckpt checkpoints/random-llama3-8b --device cuda --decode

--layers N keeps the first N blocks (load and host peak are still the whole model's); the row
gives seconds per block, so the full model's time is about that times 32. --resume-check and
--decode replace the method table. --work DIR makes a run resumable: interrupted and started
again with the same options, it goes on from the saved blocks (and TaCQ's saved masks); each
run's row then covers only what that run did.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mixq  # noqa: E402
import model as llama  # noqa: E402
from bench_load import checkpoint_bytes, peak_rss_gb, time_generation  # noqa: E402
from e2e_gpu import swap_in_quant_linears  # noqa: E402

HEADER = ("| method | wbits | groupsize | blocks | calibration | quantize s | s/block | "
          "peak GPU GiB | peak host GiB | host / ckpt | avg bits |\n" + "|---" * 11 + "|")


def load(a, device="cpu"):
    model, _ = llama.load(a.ckpt, "bf16", device)
    n_all = len(model.layers)
    if a.layers:
        model.layers = model.layers[:a.layers]
    return model, n_all


def gpu_gb(device, peak=False):
    if not device.startswith("cuda"):
        return None
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30


def tacq_masks(model, calib, cfg, device, work, fp, log):
    """TaCQ's 16-bit masks; with a work directory, saved there once (with the run's fingerprint)
    and reused by the next run, so an interrupted run can go on from them."""
    from safetensors.torch import load_file, save_file
    path = work / "masks.safetensors" if work else None
    if path is not None and path.exists():
        if json.loads((work / "masks.json").read_text()) != fp:
            raise SystemExit(f"{path} is from a run with other settings; use another --work")
        log(f"masks: reusing {path}")
        return load_file(str(path))
    masks = mixq.global_top_k_masks(mixq.tacq_scores(model, calib, None, cfg, device, log), cfg.ratio)
    if path is not None:
        work.mkdir(parents=True, exist_ok=True)
        save_file(masks, str(work / ".masks.tmp"))
        (work / "masks.json").write_text(json.dumps(fp))
        os.replace(work / ".masks.tmp", path)
    return masks


def child_method(a):
    """Load on the CPU, quantize block by block on a.device (quantize_model) -> the row."""
    # TaCQ's gradient pass runs on the model's device: the whole model goes to the GPU
    model, n_all = load(a, a.device if a.one == "tacq" else "cpu")
    g = torch.Generator().manual_seed(0)
    calib = None if a.one == "rtn" else torch.randint(0, model.args.vocab_size,
                                                      (a.nsamples, a.seqlen), generator=g)
    cfg = mixq.method_config(a.one, mixq.QuantConfig(wbits=a.wbits, groupsize=a.groupsize,
                                               iters=a.iters, ratio=a.ratio))
    work = Path(a.work) / a.one if a.work else None  # a run split over several calls
    resume = str(work / "blocks") if work else a.resume_dir
    job = mixq.Job(ckpt=a.ckpt, method=a.one, calib="random-tokens", dtype="bf16")
    fp = mixq.run_fingerprint(job, model, a.one, cfg, calib) | {
        "layers": len(model.layers)} if resume else None
    log = lambda s: print("   ", s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    masks = None
    if a.one == "tacq":  # gradients, reference GPTQ, scores, global top-k (logged with times)
        masks = tacq_masks(model, calib, cfg, a.device, work, fp, log)
        log(f"TaCQ scores and mask: {time.perf_counter() - t0:.1f}s, peak GPU "
            f"{fmt(gpu_gb(a.device, True), '{:.2f}')} GiB")
    if a.one == "resq":  # covariances and fused bases, one block on the GPU at a time
        mixq.resq_prepare(model, calib, cfg, log=log, device=a.device)
        log(f"ResQ bases: {time.perf_counter() - t0:.1f}s, peak GPU "
            f"{fmt(gpu_gb(a.device, True), '{:.2f}')} GiB")
    res = mixq.quantize_model(model, calib, "gptq" if a.one == "tacq" else a.one, cfg,
                           device=a.device, resume=resume, fingerprint=fp, log=log,
                           masks=masks)
    secs, n = time.perf_counter() - t0, len(model.layers)
    row = {"method": a.one, "wbits": cfg.wbits, "groupsize": cfg.groupsize, "blocks": n,
           "blocks_total": n_all, "calib": None if a.one == "rtn" else [a.nsamples, a.seqlen],
           "quantize_s": secs, "s_per_block": secs / n, "peak_gpu_gb": gpu_gb(a.device, True),
           "peak_host_gb": peak_rss_gb(), "avg_bits": mixq.average_bits(res)}
    if a.save_tensors:  # final weights and packed tensors of every linear, for --resume-check
        from safetensors.torch import save_file
        t = {f"{k}.{p}": v for k, r in res.items() for p, v in (r["tensors"] or {}).items()}
        t |= {f"{k}.weight": model.get_submodule(k).weight.data.contiguous() for k in res}
        save_file(t, a.save_tensors)
    return row


def decode_speed(model, a, static=False, compile=False):
    """Greedy decode tokens/s at batch 1 after a warm-up (bench_load.time_generation); static:
    the decoding steps replay a CUDA graph (model.static_decoder), compile: of the step after
    torch.compile."""
    model.setup_cache(1, a.prompt_len + a.new_tokens)
    step = model.static_decoder(compile=compile) if static else None

    def forward(ids, start):
        if step is not None and start > 0:
            return step(ids, start)[:, -1]
        return model(ids, start_pos=start, last_only=True)[:, -1]
    time_generation(forward, a.prompt_len, min(8, a.new_tokens), model.args.vocab_size, a.device)
    _, dec = time_generation(forward, a.prompt_len, a.new_tokens, model.args.vocab_size,
                             a.device)
    model.setup_cache(1, None)
    return dec


def fused_speeds(model, a, key):
    """Decode tokens/s of a model after fuse_projections: CUDA graph, and compiled."""
    out = {f"{key}_fused_graph_tok_s": decode_speed(model, a, True)}
    if a.compile:
        out[f"{key}_fused_compiled_tok_s"] = decode_speed(model, a, True, compile=True)
    return out


def child_decode(a):
    """bf16 on a.device, then the same model RTN-quantized in place with its linears swapped for
    kernels.QuantLinear (as model.load_quantized does), timed the same way."""
    model, _ = load(a, a.device)
    out = {"bf16_tok_s": decode_speed(model, a), "bf16_graph_tok_s": decode_speed(model, a, True),
           "bf16_gpu_gb": gpu_gb(a.device)}
    if a.compile:
        out["bf16_compiled_tok_s"] = decode_speed(model, a, True, compile=True)
    if a.fuse:  # q/k/v and gate/up stacked (model.fuse_projections), then split back
        model.fuse_projections()
        out |= fused_speeds(model, a, "bf16")
        model.split_projections()
    cfg = mixq.QuantConfig(wbits=a.wbits, groupsize=a.groupsize)
    res = mixq.quantize_model(model, None, "rtn", cfg, device=a.device, log=lambda s: None)
    swap_in_quant_linears(model, res, cfg.groupsize)
    del res
    torch.cuda.empty_cache()  # a no-op without CUDA
    out |= {"q_tok_s": decode_speed(model, a), "q_graph_tok_s": decode_speed(model, a, True),
            "q_gpu_gb": gpu_gb(a.device)}
    if a.compile:
        out["q_compiled_tok_s"] = decode_speed(model, a, True, compile=True)
    if a.fuse:
        model.fuse_projections()
        out |= fused_speeds(model, a, "q")
    # the same greedy continuation through the Triton kernels (in a CUDA graph) and through the
    # torch path (eager)?
    prompt = torch.randint(0, model.args.vocab_size, (a.prompt_len,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    via_kernel = model.generate(prompt, a.new_tokens, stop_ids=[], static=True)
    os.environ["MIXQ_TORCH_PATH"] = "1"
    via_torch = model.generate(prompt, a.new_tokens, stop_ids=[])
    del os.environ["MIXQ_TORCH_PATH"]
    same = next((i for i, (u, v) in enumerate(zip(via_kernel, via_torch)) if u != v),
                len(via_kernel))
    return out | {"greedy_same_prefix": same, "greedy_tokens": len(via_kernel)}


def spawn(a, one, extra=()):
    """This script, with the parent's options, as a child for one job."""
    return subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--device", a.device,
                             "--one", one, *map(str, extra)])


def run_child(a, one, result, extra=()):
    rc = spawn(a, one, ["--result", result, *extra]).wait()
    return json.loads(Path(result).read_text()) if rc == 0 else {"method": one, "failed": rc}


def fmt(v, f="{:.1f}"):
    return "-" if v is None else f.format(v)


def table_row(r, ckpt_gb):
    if "failed" in r:
        return f"| {r['method']} | failed (exit {r['failed']}) |" + " |" * 9
    cal = "-" if r["calib"] is None else f"{r['calib'][0]} x {r['calib'][1]}"
    return (f"| {r['method']} | {r['wbits']} | {r['groupsize']} | {r['blocks']}/"
            f"{r['blocks_total']} | {cal} | {r['quantize_s']:.1f} | {r['s_per_block']:.2f} | "
            f"{fmt(r['peak_gpu_gb'], '{:.2f}')} | {r['peak_host_gb']:.2f} | "
            f"{r['peak_host_gb'] / ckpt_gb:.2f}x | {r['avg_bits']:.3f} |")


def decode_line(a, d):
    if "failed" in d:
        return f"decode failed (exit {d['failed']})"
    gb = "{:.2f} GiB allocated on the GPU"
    compiled = "" if "q_compiled_tok_s" not in d else (
        f"  torch.compile + CUDA graph: bf16 {d['bf16_compiled_tok_s']:.1f} tok/s, "
        f"W{a.wbits} {d['q_compiled_tok_s']:.1f} tok/s, ratio "
        f"{d['q_compiled_tok_s'] / d['bf16_compiled_tok_s']:.2f}x\n")
    for how, k in [("q/k/v and gate/up fused, CUDA graph", "fused_graph"),
                   ("fused, torch.compile + CUDA graph", "fused_compiled")]:
        if f"q_{k}_tok_s" in d:
            compiled += (f"  {how}: bf16 {d[f'bf16_{k}_tok_s']:.1f} tok/s, W{a.wbits} "
                         f"{d[f'q_{k}_tok_s']:.1f} tok/s, ratio "
                         f"{d[f'q_{k}_tok_s'] / d[f'bf16_{k}_tok_s']:.2f}x\n")
    return (f"decode, batch 1, prompt {a.prompt_len}, {a.new_tokens} new tokens, greedy:\n"
            f"  bf16: {d['bf16_tok_s']:.1f} tok/s eager, {d['bf16_graph_tok_s']:.1f} CUDA graph "
            f"({fmt(d['bf16_gpu_gb'], gb)})\n"
            f"  W{a.wbits} g{a.groupsize} QuantLinear: {d['q_tok_s']:.1f} tok/s eager, "
            f"{d['q_graph_tok_s']:.1f} CUDA graph ({fmt(d['q_gpu_gb'], gb)})\n"
            f"  ratio 4-bit / bf16: {d['q_tok_s'] / d['bf16_tok_s']:.2f}x eager, "
            f"{d['q_graph_tok_s'] / d['bf16_graph_tok_s']:.2f}x CUDA graph\n" + compiled +
            f"  greedy tokens equal, kernel path (graph) vs torch path (eager): first "
            f"{d['greedy_same_prefix']} of {d['greedy_tokens']}")


def blocks_done(state: Path) -> int:
    return json.loads(state.read_text())["blocks_done"] if state.exists() else 0


def resume_check(a, tmp: Path, kill_after=2):
    """GPTQ uninterrupted vs. GPTQ SIGKILLed once `kill_after` blocks are saved, then resumed
    from the same dir: every packed tensor and final weight must be bit for bit the same."""
    ref, resumed, rdir = tmp / "ref.safetensors", tmp / "resumed.safetensors", tmp / "resume"
    print("uninterrupted run:", flush=True)
    run_child(a, "gptq", tmp / "r0.json", ["--save-tensors", ref])
    print(f"run with --resume, killed after {kill_after} blocks:", flush=True)
    p = spawn(a, "gptq", ["--result", tmp / "r1.json", "--resume-dir", rdir])
    while p.poll() is None and blocks_done(rdir / "state.json") < kill_after:
        time.sleep(0.01)
    p.kill()  # SIGKILL
    rc = p.wait()
    killed_at = blocks_done(rdir / "state.json")
    print(f"killed (exit {rc}) with {killed_at} block(s) saved; resuming:", flush=True)
    run_child(a, "gptq", tmp / "r2.json", ["--resume-dir", rdir, "--save-tensors", resumed])
    if not (ref.exists() and resumed.exists()):
        print("resume check failed: a run did not finish (see its output above)")
    elif rc == 0:
        print("resume check inconclusive: the run finished before the kill (use more --layers)")
    else:
        diff = first_difference(ref, resumed)
        print(f"resume after kill: {diff or 'identical'} (killed after block {killed_at})")


def first_difference(path_a, path_b):
    """None if the two safetensors files hold the same tensors bit for bit, else a message."""
    from safetensors.torch import load_file
    x, y = load_file(path_a), load_file(path_b)
    if set(x) != set(y):
        return f"DIFFERENT tensor names, e.g. {sorted(set(x) ^ set(y))[0]}"
    diff = [k for k in sorted(x) if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])]
    if not diff:
        return None
    k = diff[0]
    more = "" if x[k].shape != y[k].shape else (
        f": {int((x[k] != y[k]).sum())} elements differ, max abs diff "
        f"{float((x[k].float() - y[k].float()).abs().max()):.3g}")
    return f"DIFFERENT, first {k}{more} ({len(diff)} of {len(x)} tensors differ)"


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="checkpoints/random-llama3-8b")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "quantease", "spqr"],
                   choices=["rtn", "gptq", "quantease", "spqr", "tacq", "resq"])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--layers", type=int, default=0, help="first N blocks only; 0: all")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--groupsize", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.0035, help="TaCQ's 16-bit share")
    p.add_argument("--iters", type=int, default=mixq.QuantConfig.iters, help="QuantEase sweeps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--resume-check", action="store_true", help="GPTQ kill-and-resume check")
    p.add_argument("--decode", action="store_true", help="bf16 vs 4-bit decode tokens/s")
    p.add_argument("--compile", action="store_true",
                   help="--decode: also time the step after torch.compile")
    p.add_argument("--fuse", action="store_true",
                   help="--decode: also time with q/k/v and gate/up fused (fuse_projections)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--work", default=None,
                   help="keep each method's finished blocks (and TaCQ's masks) here: the same "
                        "command again goes on from them (an interrupted run resumes)")
    for internal in ("--one", "--result", "--resume-dir", "--save-tensors"):
        p.add_argument(internal, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:  # a child: one job, its result as JSON in a.result
        out = child_decode(a) if a.one == "decode" else child_method(a)
        if a.result:
            Path(a.result).write_text(json.dumps(out))
        return
    ckpt_gb = checkpoint_bytes(llama.resolve_ckpt(a.ckpt)) / 2 ** 30
    print(f"{a.ckpt}: {ckpt_gb:.2f} GiB of safetensors; device {a.device}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_8b-") as tmp:
        tmp = Path(tmp)
        if a.resume_check:
            resume_check(a, tmp)
        if a.decode:
            print(decode_line(a, run_child(a, "decode", tmp / "decode.json")))
        if a.resume_check or a.decode:
            return
        rows = []
        for method in a.methods:
            print(f"{method}:", flush=True)
            rows.append(run_child(a, method, tmp / f"{method}.json"))
            print(HEADER.splitlines()[0] + "\n" + table_row(rows[-1], ckpt_gb), flush=True)
    print(f"\n{HEADER}\n" + "\n".join(table_row(r, ckpt_gb) for r in rows))
    print(f"quantize s covers the blocks shown (N/total); the whole model takes about s/block x "
          f"total. host / ckpt: peak RSS over the checkpoint's {ckpt_gb:.2f} GiB on disk.")
    if a.json:
        Path(a.json).write_text(json.dumps({"ckpt": a.ckpt, "ckpt_gb": ckpt_gb, "rows": rows},
                                           indent=2))


if __name__ == "__main__":
    main()
