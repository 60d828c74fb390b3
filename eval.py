"""eval.py: perplexity (GPTQ protocol) and speed of a model from model.py.

Sections
  1. Corpora      pydoc (Python's own docs, offline, the default), text:PATH, wikitext2:DIR
  2. Perplexity   the GPTQ protocol: tokenize once without BOS, non-overlapping windows of seqlen,
                  drop the remainder, ppl = exp(mean NLL over every predicted token)
  3. Speed        prefill and decode tokens/s
  4. Tasks        built-in tasks (capitals, compare, arith) and jsonl files; multiple choice by
                  log-likelihood (acc, acc_norm), generation by greedy exact match
  5. CLI          python eval.py [--ckpt X] [--corpus pydoc] [--seqlen 512] [--windows N] [--json OUT]

Imports flow one way: this file imports only model.py, and only in its CLI: the functions take
a model object (anything that maps token ids (1, T) to logits (1, T, vocab) and has a .device),
so eval.py can be copied alone.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Corpora

CALIB_FRACTION = 0.9  # pydoc: the first 90% of tokens calibrate, the last 10% evaluate


def pydoc_text() -> str:
    """Python's own topic documentation (pydoc_data.topics): real English prose, ships with Python."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents, or a clear error naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


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
        return read_text(path)
    if kind == "wikitext2" and arg:
        name = "wiki.test.raw" if split == "eval" else "wiki.train.raw"
        path = Path(arg).expanduser() / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: wikitext2:DIR wants the directory of "
                                    f"wikitext-2-raw-v1 (wiki.train.raw, wiki.test.raw)")
        return read_text(path)
    raise ValueError(f"unknown corpus {spec!r}: use pydoc, text:PATH or wikitext2:DIR")


def corpus_tokens(spec: str, tokenizer, split: str = "eval") -> torch.Tensor:
    """Token ids (1-D), tokenized once without BOS. For pydoc, split='eval' is the last 10% of the
    tokens and split='calib' the first 90%; 'all' is everything."""
    ids = torch.tensor(tokenizer.encode(corpus_text(spec, split)), dtype=torch.long)
    if spec == "pydoc" and split != "all":
        cut = int(CALIB_FRACTION * len(ids))
        ids = ids[cut:] if split == "eval" else ids[:cut]
    return ids


# -----------------------------------------------------------------------------
# 2. Perplexity


def check_windows(seqlen: int, windows: Optional[int] = None):
    """A window predicts seqlen - 1 tokens: at least 2 tokens, and at least 1 window."""
    if seqlen < 2 or (windows is not None and windows < 1):
        raise ValueError(f"seqlen {seqlen}, windows {windows}: want a window of at least 2 "
                         "tokens and at least 1 window")


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, seqlen: int = 512,
               windows: Optional[int] = None, progress: bool = False) -> dict:
    """GPTQ-protocol perplexity of `tokens` (1-D): windows [i*seqlen, (i+1)*seqlen), no context
    across windows, the remainder dropped; ppl = exp(sum of NLL / number of predicted tokens)."""
    check_windows(seqlen, windows)
    n = len(tokens) // seqlen
    if windows is not None:
        n = min(n, windows)
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {seqlen}")
    nll, count, t0 = 0.0, 0, time.perf_counter()
    live = progress and sys.stdout.isatty()  # a line that rewrites itself: only on a terminal
    for i in range(n):
        x = tokens[i * seqlen:(i + 1) * seqlen].to(model.device)[None]  # (1, seqlen)
        logits = model(x).float()  # (1, seqlen, vocab)
        # each position predicts the next token: seqlen - 1 predictions per window
        nll += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        count += seqlen - 1
        if live:
            print(f"\r  window {i + 1}/{n}  running ppl {math.exp(nll / count):.3f}", end="",
                  flush=True)
    if live:  # erased, for the result line that follows
        print("\r" + " " * 50 + "\r", end="", flush=True)
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
def speed(model: torch.nn.Module, prompt_len: int = 512, new_tokens: int = 32, repeats: int = 3,
          vocab: Optional[int] = None, static: bool = False, compile: bool = False) -> dict:
    """Prefill tokens/s (one forward of prompt_len tokens) and decode tokens/s (batch 1, KV
    cache, one token per step), best of `repeats`, on random token ids. static: decode with
    model.static_decoder (a CUDA graph replay per token on a GPU); compile: its step through
    torch.compile (implies static; the first repeat compiles, the best of them counts)."""
    vocab = vocab or model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (1, prompt_len), generator=g).to(model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    prefill, decode = [], []
    for _ in range(repeats):
        model.setup_cache(1, prompt_len + new_tokens)
        step = model.static_decoder(compile) if static or compile else \
            (lambda t, pos: model(t, start_pos=pos, last_only=True))
        sync()
        t0 = time.perf_counter()
        logits = model(x, start_pos=0, last_only=True)
        sync()
        prefill.append(time.perf_counter() - t0)
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        t0 = time.perf_counter()
        for i in range(new_tokens):
            nxt = step(nxt, prompt_len + i)[:, -1].argmax(-1, keepdim=True)
        sync()
        decode.append(time.perf_counter() - t0)
    model.setup_cache(1, None)
    return {"prefill_tokens_per_s": prompt_len / min(prefill),
            "decode_tokens_per_s": new_tokens / min(decode),
            "prompt_len": prompt_len, "new_tokens": new_tokens}


# -----------------------------------------------------------------------------
# 4. Tasks: multiple choice and generation, scored as lm-eval does
#
# An item is {"question", "choices", "answer": index} (multiple choice), {"question", "answer"}
# (generation; GSM8K's "... #### 42" allowed) or {"text"} (plain text, calibration only).
# Prompt: "{fewshot}Question: {question}\nAnswer:"; a choice or answer follows after one space.

CAPITALS = {  # country -> capital, for the built-in `capitals` task
    "Afghanistan": "Kabul", "Algeria": "Algiers", "Argentina": "Buenos Aires",
    "Australia": "Canberra", "Austria": "Vienna", "Bangladesh": "Dhaka", "Belgium": "Brussels",
    "Bolivia": "La Paz", "Brazil": "Brasilia", "Bulgaria": "Sofia", "Cambodia": "Phnom Penh",
    "Canada": "Ottawa", "Chile": "Santiago", "China": "Beijing", "Colombia": "Bogota",
    "Croatia": "Zagreb", "Cuba": "Havana", "Czech Republic": "Prague", "Denmark": "Copenhagen",
    "Ecuador": "Quito", "Egypt": "Cairo", "England": "London", "Estonia": "Tallinn",
    "Ethiopia": "Addis Ababa", "Finland": "Helsinki", "France": "Paris", "Germany": "Berlin",
    "Ghana": "Accra", "Greece": "Athens", "Hungary": "Budapest", "Iceland": "Reykjavik",
    "India": "New Delhi", "Indonesia": "Jakarta", "Iran": "Tehran", "Iraq": "Baghdad",
    "Ireland": "Dublin", "Israel": "Jerusalem", "Italy": "Rome", "Jamaica": "Kingston",
    "Japan": "Tokyo", "Jordan": "Amman", "Kenya": "Nairobi", "Latvia": "Riga",
    "Lebanon": "Beirut", "Lithuania": "Vilnius", "Malaysia": "Kuala Lumpur", "Mexico": "Mexico City",
    "Mongolia": "Ulaanbaatar", "Morocco": "Rabat", "Nepal": "Kathmandu",
    "Netherlands": "Amsterdam", "New Zealand": "Wellington", "Nigeria": "Abuja",
    "North Korea": "Pyongyang", "Norway": "Oslo", "Pakistan": "Islamabad", "Peru": "Lima",
    "Philippines": "Manila", "Poland": "Warsaw", "Portugal": "Lisbon", "Romania": "Bucharest",
    "Russia": "Moscow", "Saudi Arabia": "Riyadh", "Scotland": "Edinburgh", "Senegal": "Dakar",
    "Serbia": "Belgrade", "Singapore": "Singapore", "Slovakia": "Bratislava",
    "South Korea": "Seoul", "Spain": "Madrid", "Sweden": "Stockholm", "Switzerland": "Bern",
    "Syria": "Damascus", "Taiwan": "Taipei", "Thailand": "Bangkok", "Tunisia": "Tunis",
    "Turkey": "Ankara", "Uganda": "Kampala", "Ukraine": "Kyiv", "United States": "Washington",
    "Uruguay": "Montevideo", "Venezuela": "Caracas", "Vietnam": "Hanoi", "Zimbabwe": "Harare",
}


@dataclass
class Task:
    name: str
    kind: str  # "mc" (multiple choice), "gen" (generation) or "text"
    items: list
    fewshot: str = ""  # prepended to every prompt


def _split(items: list, split: str, seed: int) -> list:
    """A fixed shuffle, then the first half calibrates and the second half tests."""
    items = list(items)
    random.Random(seed).shuffle(items)
    half = len(items) // 2
    return items[:half] if split == "calib" else items[half:]


def task_capitals(split: str) -> Task:
    """Multiple choice, 4 choices (chance 25%): the capital of a country; the three wrong choices
    are other capitals drawn with a fixed seed. Zero-shot."""
    countries = _split(sorted(CAPITALS), split, seed=0)
    rng, items = random.Random(1), []
    for c in countries:
        wrong = rng.sample(sorted(v for k, v in CAPITALS.items() if k != c), 3)
        choices = wrong + [CAPITALS[c]]
        rng.shuffle(choices)
        items.append({"question": f"What is the capital of {c}?", "choices": choices,
                      "answer": choices.index(CAPITALS[c])})
    return Task("capitals", "mc", items)


def task_compare(split: str) -> Task:
    """Multiple choice, 2 choices (chance 50%): the larger of two two-digit numbers, 400 distinct
    pairs drawn with a fixed seed. Zero-shot."""
    rng, items = random.Random(2), []
    pairs = [(a, b) for a in range(10, 100) for b in range(a + 1, 100)]
    for a, b in rng.sample(pairs, 400):  # 400 distinct pairs, the larger first or second
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        items.append({"question": f"Which number is larger, {a} or {b}?",
                      "choices": [str(a), str(b)], "answer": 0 if a > b else 1})
    return Task("compare", "mc", _split(items, split, seed=3))


def task_arith(split: str) -> Task:
    """Generation, exact match: a + b for a in 1..19, b in 1..9 (171 sums), two-shot, greedy."""
    items = [{"question": f"What is {a} + {b}?", "answer": str(a + b)}
             for a in range(1, 20) for b in range(1, 10)]
    shots = "Question: What is 2 + 3?\nAnswer: 5\n\nQuestion: What is 4 + 1?\nAnswer: 5\n\n"
    return Task("arith", "gen", _split(items, split, seed=4), fewshot=shots)


TASKS = {"capitals": task_capitals, "compare": task_compare, "arith": task_arith}


def load_task(spec: str, split: str = "eval") -> Task:
    """task:NAME (built-in; split 'calib' or 'eval') or jsonl:PATH (one item per line; the kind
    is read off the first item's fields)."""
    kind, _, arg = spec.partition(":")
    if kind == "task":
        if arg not in TASKS:
            raise ValueError(f"unknown task {arg!r}; built-in tasks: {', '.join(TASKS)}")
        return TASKS[arg](split)
    if kind == "jsonl":
        path = Path(arg).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"task file {path} does not exist")
        items, where = [], []
        for i, line in enumerate(read_text(path).splitlines(), 1):
            try:
                items += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not JSON ({e})") from None
            where += [f"{path}, line {i}"] if line.strip() else []
        if not items:
            raise ValueError(f"{path} holds no items")
        first = items[0] if isinstance(items[0], dict) else {}
        kind = "mc" if "choices" in first else "gen" if "answer" in first else \
            "text" if "text" in first else None
        fields = {"mc": ("question", "choices", "answer"), "gen": ("question", "answer"),
                  "text": ("text",), None: ("question", "choices", "answer")}[kind]
        for at, item in zip(where, items):
            if not isinstance(item, dict) or any(f not in item for f in fields):
                raise ValueError(f"{at}: want fields {'/'.join(fields)} like the first item "
                                 "(multiple choice: question/choices/answer; generation: "
                                 "question/answer; text: text)")
            problem = item_problem(kind, item)
            if problem:
                raise ValueError(f"{at}: {problem}")
        return Task(path.stem, kind, items)
    raise ValueError(f"unknown task spec {spec!r}: use task:NAME or jsonl:PATH")


def item_problem(kind: str, item: dict) -> Optional[str]:
    """What is wrong with one jsonl item's fields (None: nothing): a text is a non-empty string;
    a question a string; choices a list of at least two strings; a multiple-choice answer the
    integer index of one of them; a generation answer a string or a number."""
    def is_number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    if kind == "text":
        return None if isinstance(item["text"], str) and item["text"] else \
            f"text {item['text']!r}: want a non-empty string"
    if not isinstance(item["question"], str):
        return f"question {item['question']!r}: want a string"
    if kind == "gen":
        return None if isinstance(item["answer"], str) or is_number(item["answer"]) else \
            f"answer {item['answer']!r}: want a string or a number"
    choices, answer = item["choices"], item["answer"]
    if not isinstance(choices, list) or len(choices) < 2 or \
            not all(isinstance(c, str) for c in choices):
        return f"choices {choices!r}: want a list of at least two strings"
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return f"answer {answer!r}: want the index of the right choice, 0 to {len(choices) - 1}"
    return None


def is_task(spec: str) -> bool:
    return spec.startswith(("task:", "jsonl:"))


def prompt(task: Task, item: dict) -> str:
    return f"{task.fewshot}Question: {item['question']}\nAnswer:"


def gold_answer(item: dict) -> str:
    """The reference answer text; GSM8K-style "reasoning #### 42" gives "42"."""
    return str(item["answer"]).split("####")[-1].strip()


def calibration_text(task: Task, item: dict) -> tuple:
    """(context, answer) texts of one item for calibration: the answer is what the loss scores."""
    if task.kind == "text":
        return "", item["text"]
    ans = item["choices"][item["answer"]] if task.kind == "mc" else str(item["answer"])
    return prompt(task, item), " " + ans


@torch.no_grad()
def continuation_logprobs(model, tokenizer, items: list, max_tokens: int = 1024) -> list:
    """log p(continuation | context) for each continuation of each item (context, continuations)
    -> one list per item. Context and continuation are tokenized together and only the
    continuation's tokens are scored (so the boundary token is the one the model would see).
    An item's sequences are right-padded to its longest, T tokens: causal attention keeps the
    padding out of the scores. Items of the same T share a forward (up to max_tokens tokens), so
    each row gets the numbers it gets alone up to the order of the BLAS's sums, which may
    change with the number of rows (tests/test_tasks.py)."""
    # perf: one forward per item ran the model on a handful of short rows at a time
    out = [None] * len(items)
    by_length = {}  # T -> [(item index, context length, its sequences)]
    for i, (context, continuations) in enumerate(items):
        seqs = [tokenizer.encode(context + c) for c in continuations]
        by_length.setdefault(max(map(len, seqs)), []).append(
            (i, len(tokenizer.encode(context)), seqs))
    for T, group in by_length.items():
        batches = [[]]
        for entry in group:
            rows = sum(len(seqs) for _, _, seqs in batches[-1]) + len(entry[2])
            if batches[-1] and rows * T > max_tokens:
                batches.append([])
            batches[-1].append(entry)
        for batch in batches:
            x = torch.tensor([s + [0] * (T - len(s)) for _, _, seqs in batch for s in seqs],
                             device=model.device)  # (rows, T)
            logp = torch.log_softmax(model(x).float(), dim=-1)  # (rows, T, vocab)
            r = 0
            for i, n, seqs in batch:
                out[i] = [sum(logp[r + j, t - 1, s[t]].item() for t in range(n, len(s)))
                          for j, s in enumerate(seqs)]
                r += len(seqs)
    return out


def multiple_choice(model, tokenizer, task: Task, limit=None) -> dict:
    """acc: argmax of log p(" " + choice); acc_norm: argmax of that / len(choice) in characters."""
    acc = acc_norm = 0
    items = task.items[:limit]
    scores = continuation_logprobs(model, tokenizer, [
        (prompt(task, item), [" " + c for c in item["choices"]]) for item in items])
    for item, lls in zip(items, scores):
        norm = [ll / len(c) for ll, c in zip(lls, item["choices"])]  # lm-eval: the choice text
        acc += max(range(len(lls)), key=lls.__getitem__) == item["answer"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == item["answer"]
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def generation(model, tokenizer, task: Task, max_new_tokens: int = 8, limit=None) -> dict:
    """Greedy continuation up to a newline; exact match of its stripped first line (after any
    "####") with the reference answer."""
    newline = tokenizer.encode("\n")
    stop = tokenizer.stop_ids() + (newline if len(newline) == 1 else [])
    hits, items = 0, task.items[:limit]
    for item in items:
        ids = tokenizer.encode(prompt(task, item))
        out = model.generate(ids, max_new_tokens, stop_ids=stop)
        text = tokenizer.decode(out).split("\n")[0].split("####")[-1].strip()
        hits += text == gold_answer(item)
    return {"exact_match": hits / len(items), "n": len(items)}


def task_accuracy(model, tokenizer, spec: str, limit=None) -> dict:
    task = load_task(spec, "eval")
    if task.kind == "mc":
        return multiple_choice(model, tokenizer, task, limit)
    if task.kind == "gen":
        return generation(model, tokenizer, task, limit=limit)
    raise ValueError(f"{spec}: plain-text items have nothing to score; use it for calibration")


def task_protocol(spec: str, res: dict) -> str:
    if "acc" in res:
        return (f"{spec}: {res['n']} test items, multiple choice by log-likelihood of ' choice' "
                f"(acc; acc_norm divides by its length in characters)")
    return (f"{spec}: {res['n']} test items, greedy generation to the first newline, exact match")


def check_spec(spec: str, split: str = "eval", flag: str = "--eval"):
    """Fail on a bad corpus or task spec before any long work, naming the flag."""
    try:
        load_task(spec, split) if is_task(spec) else corpus_text(spec, split)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{flag} {spec}: {e}") from None


def evaluate(model, tokenizer, specs, seqlen=512, windows=None, task_limit=None) -> dict:
    """Perplexity for corpus specs, accuracy for task specs; each printed with its protocol."""
    out = {}
    for spec in specs:
        if is_task(spec):
            out[spec] = r = task_accuracy(model, tokenizer, spec, task_limit)
            score = " ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "n")
            print(f"  {task_protocol(spec, r)}: {score}")
            continue
        r = perplexity(model, corpus_tokens(spec, tokenizer, "eval"), seqlen, windows,
                       progress=True)
        out[spec] = {k: r[k] for k in ("ppl", "tokens", "windows")} | {"seqlen": seqlen}
        split = "eval" if spec == "pydoc" else "test"
        print(f"  {protocol(spec, split, seqlen, r['windows'], r['tokens'])}: ppl {r['ppl']:.3f}")
    return out


# -----------------------------------------------------------------------------
# 5. CLI


def json_safe(obj):
    """obj with every non-finite float written as a string ("nan", "inf"): strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def check_output_file(path, flag: str):
    """Fail now, not after the work, when `path` cannot become a file: it is a directory, or
    its nearest existing parent is not a directory we can create files in."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory: give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {parent} ({e.strerror})") from None


def write_json(path, obj):
    """Write strict JSON atomically: a temp file next to `path`, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main():
    import argparse

    import model as llama
    p = argparse.ArgumentParser(description="Perplexity (GPTQ protocol) and speed of a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None, help="short name, HF directory or .gguf file; "
                   "None: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--corpus", default="pydoc", help="pydoc | text:PATH | wikitext2:DIR")
    p.add_argument("--seqlen", type=int, default=512, help="window length")
    p.add_argument("--windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--tasks", nargs="*", default=[], help="task accuracy too: task:NAME "
                   f"({', '.join(TASKS)}) or jsonl:PATH")
    p.add_argument("--eval", nargs="+", default=None, metavar="SPEC",
                   help="as mixq.py's --eval: one corpus and any task:/jsonl: specs, in place "
                   "of --corpus and --tasks")
    p.add_argument("--speed", action="store_true", help="also measure prefill/decode tokens/s")
    p.add_argument("--static", action="store_true",
                   help="--speed: decode with static shapes (a CUDA graph on a GPU)")
    p.add_argument("--compile", action="store_true",
                   help="--speed: --static, the decoding step through torch.compile first")
    p.add_argument("--fuse", action="store_true",
                   help="stack q/k/v and gate/up into one linear each (same outputs)")
    p.add_argument("--dtype", default="fp32", choices=sorted(llama.DTYPES), help="weights dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    a = p.parse_args()
    if a.eval is not None:  # mixq.py's spelling
        corpora = [s for s in a.eval if not is_task(s)]
        if len(corpora) > 1:
            raise SystemExit(f"error: --eval: one corpus per run, not {corpora}")
        a.corpus, a.tasks = (corpora or [a.corpus])[0], [s for s in a.eval if is_task(s)]
    try:
        check_windows(a.seqlen, a.windows)
        if a.json:
            check_output_file(a.json, "--json")
        for spec in [a.corpus, *a.tasks]:  # the specs, before the (slow) model load
            check_spec(spec, "eval", "--eval" if a.eval else "--corpus" if spec == a.corpus
                       else "--tasks")
        model, tok = llama.load(a.ckpt, a.dtype, a.device)
    except (llama.CheckpointError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if tok is None:
        raise SystemExit("error: the checkpoint has no tokenizer.json")
    if a.fuse:
        model.fuse_projections()
    tokens = corpus_tokens(a.corpus, tok, "eval")
    try:
        res = perplexity(model, tokens, a.seqlen, a.windows, progress=True)
    except ValueError as e:  # a text shorter than one window
        raise SystemExit(f"error: {e}")
    split = "eval" if a.corpus == "pydoc" else "test"
    print(protocol(a.corpus, split, a.seqlen, res["windows"], res["tokens"]))
    print(f"ppl {res['ppl']:.4f}  ({res['seconds']:.1f}s, "
          f"{res['windows'] * a.seqlen / res['seconds']:.0f} tokens/s)")
    res |= {"corpus": a.corpus, "split": split, "ckpt": a.ckpt or llama.DEFAULT_MODEL,
            "dtype": a.dtype, "device": a.device}
    if a.tasks:
        res["tasks"] = evaluate(model, tok, a.tasks)
    if a.speed:
        s = speed(model, static=a.static, compile=a.compile)
        print(f"speed: prefill {s['prefill_tokens_per_s']:.0f} tokens/s ({s['prompt_len']} tokens), "
              f"decode {s['decode_tokens_per_s']:.1f} tokens/s (batch 1)")
        res["speed"] = s
    if a.json:
        write_json(a.json, res)


if __name__ == "__main__":
    main()
