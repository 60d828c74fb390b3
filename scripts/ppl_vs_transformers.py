"""Perplexity of model.py and of transformers on the same model and the same windows.

    python scripts/ppl_vs_transformers.py [--seqlen 512]

transformers loads the embedded GGUF through its own GGUF reader (its own dequantization and q/k
un-permutation), so the two numbers share nothing but the file and the token windows.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
import eval as metrics  # noqa: E402
import model as llama  # noqa: E402


class HFModel:
    """Just enough of model.Transformer's interface for eval.perplexity."""

    def __init__(self, hf):
        self.hf, self.device = hf, torch.device("cpu")

    def __call__(self, x):
        return self.hf(x, use_cache=False).logits


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seqlen", type=int, default=512)
    a = p.parse_args()
    # transformers' model classes import Hugging Face's `kernels` package: from site-packages, not
    # our kernels.py (this script loads no packed checkpoint, the only use model.py has for ours)
    sys.path.remove(ROOT)
    import transformers
    transformers.LlamaForCausalLM  # noqa: B018 (imports the model classes now)
    sys.path.insert(0, ROOT)
    ours, tok = llama.load()
    tokens = metrics.corpus_tokens("pydoc", tok, "eval")
    path = llama.embedded_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    r_ours = metrics.perplexity(ours, tokens, a.seqlen)
    r_hf = metrics.perplexity(HFModel(hf), tokens, a.seqlen)
    print(metrics.protocol("pydoc", "eval", a.seqlen, r_ours["windows"], r_ours["tokens"]))
    print(f"mixq model.py  ppl {r_ours['ppl']:.4f}")
    print(f"transformers   ppl {r_hf['ppl']:.4f}   (relative difference "
          f"{abs(r_ours['ppl'] / r_hf['ppl'] - 1):.2e})")


if __name__ == "__main__":
    main()
