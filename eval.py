"""eval.py: perplexity (GPTQ protocol) and speed of a model from model.py.

Sections
  1. Corpora      pydoc (Python's own docs, offline, the default), text:PATH, wikitext2:DIR
  2. Perplexity   the GPTQ protocol: tokenize once without BOS, non-overlapping windows of seqlen,
                  drop the remainder, ppl = exp(mean NLL over every predicted token)
  3. Speed        prefill and decode tokens/s
  4. CLI          python eval.py [--ckpt X] [--corpus pydoc] [--seqlen 512] [--windows N] [--json OUT]

Imports flow one way: this file imports only model.py.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import model as M

# -----------------------------------------------------------------------------
# 1. Corpora

CALIB_FRACTION = 0.9  # pydoc: the first 90% of tokens calibrate, the last 10% evaluate


def pydoc_text() -> str:
    """Python's own topic documentation (pydoc_data.topics): real English prose, ships with Python."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_text(spec: str, split: str = "eval") -> str:
    """The raw text behind a corpus spec. split: 'eval' (test) or 'calib' (train) where the corpus
    has files for both; pydoc is split by tokens instead, in corpus_tokens."""
    if spec == "pydoc":
        return pydoc_text()
    kind, _, arg = spec.partition(":")
    if kind == "text" and arg:
        path = Path(arg).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        return path.read_text(encoding="utf-8")
    if kind == "wikitext2" and arg:
        name = "wiki.test.raw" if split == "eval" else "wiki.train.raw"
        path = Path(arg).expanduser() / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: wikitext2:DIR wants the directory of "
                                    f"wikitext-2-raw-v1 (wiki.train.raw, wiki.test.raw)")
        return path.read_text(encoding="utf-8")
    raise ValueError(f"unknown corpus {spec!r}: use pydoc, text:PATH or wikitext2:DIR")


def corpus_tokens(spec: str, tokenizer: M.Tokenizer, split: str = "eval") -> torch.Tensor:
    """Token ids (1-D), tokenized once without BOS. For pydoc, split='eval' is the last 10% of the
    tokens and split='calib' the first 90%; 'all' is everything."""
    ids = torch.tensor(tokenizer.encode(corpus_text(spec, split)), dtype=torch.long)
    if spec == "pydoc" and split != "all":
        cut = int(CALIB_FRACTION * len(ids))
        ids = ids[cut:] if split == "eval" else ids[:cut]
    return ids


# -----------------------------------------------------------------------------
# 2. Perplexity


@torch.no_grad()
def perplexity(model: M.Transformer, tokens: torch.Tensor, seqlen: int = 512,
               windows: Optional[int] = None, progress: bool = False) -> dict:
    """GPTQ-protocol perplexity of `tokens` (1-D): windows [i*seqlen, (i+1)*seqlen), no context
    across windows, the remainder dropped; ppl = exp(sum of NLL / number of predicted tokens)."""
    n = len(tokens) // seqlen
    if windows is not None:
        n = min(n, windows)
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {seqlen}")
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for i in range(n):
        x = tokens[i * seqlen:(i + 1) * seqlen].to(model.device)[None]  # (1, seqlen)
        logits = model(x).float()  # (1, seqlen, vocab)
        # each position predicts the next token: seqlen - 1 predictions per window
        nll += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        count += seqlen - 1
        if progress:
            print(f"\r  window {i + 1}/{n}  running ppl {math.exp(nll / count):.3f}", end="",
                  flush=True)
    if progress:
        print()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": n,
            "seqlen": seqlen, "seconds": time.perf_counter() - t0}


def protocol(corpus: str, split: str, seqlen: int, windows: int, tokens: int) -> str:
    """One line that says exactly what a perplexity number measures."""
    where = f"{corpus} ({split} split)" if corpus == "pydoc" else corpus
    return (f"ppl protocol: {where}, tokenized once without BOS, {windows} non-overlapping windows "
            f"of {seqlen}, remainder dropped, exp(mean NLL) over {tokens} predicted tokens")


# -----------------------------------------------------------------------------
# 3. Speed


@torch.no_grad()
def speed(model: M.Transformer, prompt_len: int = 512, new_tokens: int = 32, repeats: int = 3,
          vocab: Optional[int] = None) -> dict:
    """Prefill tokens/s (one forward of prompt_len tokens) and decode tokens/s (batch 1, KV
    cache, one token per step), best of `repeats`, on random token ids."""
    vocab = vocab or model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (1, prompt_len), generator=g).to(model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    prefill, decode = [], []
    for _ in range(repeats):
        model.setup_cache(1, prompt_len + new_tokens)
        sync()
        t0 = time.perf_counter()
        logits = model(x, start_pos=0, last_only=True)
        sync()
        prefill.append(time.perf_counter() - t0)
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        t0 = time.perf_counter()
        for i in range(new_tokens):
            nxt = model(nxt, start_pos=prompt_len + i, last_only=True)[:, -1].argmax(-1, keepdim=True)
        sync()
        decode.append(time.perf_counter() - t0)
    model.setup_cache(1, None)
    return {"prefill_tokens_per_s": prompt_len / min(prefill),
            "decode_tokens_per_s": new_tokens / min(decode),
            "prompt_len": prompt_len, "new_tokens": new_tokens}


# -----------------------------------------------------------------------------
# 4. CLI


def write_json(path, obj):
    """Write JSON atomically: a temp file next to `path`, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def main():
    import argparse
    p = argparse.ArgumentParser(description="Perplexity (GPTQ protocol) and speed of a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None, help="short name, HF directory or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--corpus", default="pydoc", help="pydoc | text:PATH | wikitext2:DIR")
    p.add_argument("--seqlen", type=int, default=512, help="window length")
    p.add_argument("--windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--speed", action="store_true", help="also measure prefill/decode tokens/s")
    p.add_argument("--dtype", default="fp32", choices=sorted(M.DTYPES), help="weights dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    a = p.parse_args()
    try:
        corpus_text(a.corpus)  # check the corpus before the (slow) model load
        model, tok = M.load(a.ckpt, a.dtype, a.device)
    except (M.CheckpointError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if tok is None:
        raise SystemExit("error: the checkpoint has no tokenizer.json")
    tokens = corpus_tokens(a.corpus, tok, "eval")
    res = perplexity(model, tokens, a.seqlen, a.windows, progress=True)
    split = "eval" if a.corpus == "pydoc" else "test"
    print(protocol(a.corpus, split, a.seqlen, res["windows"], res["tokens"]))
    print(f"ppl {res['ppl']:.4f}  ({res['seconds']:.1f}s, "
          f"{res['windows'] * a.seqlen / res['seconds']:.0f} tokens/s)")
    res |= {"corpus": a.corpus, "split": split, "ckpt": a.ckpt or M.DEFAULT_MODEL,
            "dtype": a.dtype, "device": a.device}
    if a.speed:
        s = speed(model)
        print(f"speed: prefill {s['prefill_tokens_per_s']:.0f} tokens/s ({s['prompt_len']} tokens), "
              f"decode {s['decode_tokens_per_s']:.1f} tokens/s (batch 1)")
        res["speed"] = s
    if a.json:
        write_json(a.json, res)


if __name__ == "__main__":
    main()
