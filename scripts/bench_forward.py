"""Forward-pass speed of model.py against transformers (the oracle) on the same checkpoint.

    python scripts/bench_forward.py [--ckpt X] [--seqlen 512] [--repeats 5] [--threads 2]

Loads the checkpoint with model.py and with transformers.LlamaForCausalLM (fp32, CPU), times one
forward of `seqlen` random tokens for each, alternating, best of `repeats`, and prints tokens/s
and the ratio. transformers is a test/benchmark dependency only.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
import model as llama  # noqa: E402


def best_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None, help="HF directory or short name (default: embedded)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    # transformers' model classes import Hugging Face's `kernels` package: from site-packages, not
    # our kernels.py (this script loads no packed checkpoint, the only use model.py has for ours)
    sys.path.remove(ROOT)
    import transformers
    transformers.LlamaForCausalLM  # noqa: B018 (imports the model classes now)
    sys.path.insert(0, ROOT)
    torch.set_num_threads(a.threads)
    path = llama.resolve_ckpt(a.ckpt)
    ours, _ = llama.load(str(path))
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    x = torch.randint(0, ours.args.vocab_size, (1, a.seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
        t_ours = best_time(lambda: ours(x), a.repeats)
        t_theirs = best_time(lambda: theirs(x, use_cache=False), a.repeats)
    print(f"checkpoint {path}  seqlen {a.seqlen}  threads {a.threads}  fp32 CPU  "
          f"best of {a.repeats}  (max |logit diff| {diff:.2e})")
    print("| implementation | seconds | tokens/s |")
    print("|---|---|---|")
    print(f"| mixq model.py | {t_ours:.3f} | {a.seqlen / t_ours:.0f} |")
    print(f"| transformers {transformers.__version__} | {t_theirs:.3f} | {a.seqlen / t_theirs:.0f} |")
    print(f"time ratio mixq / transformers: {t_ours / t_theirs:.3f}")


if __name__ == "__main__":
    main()
