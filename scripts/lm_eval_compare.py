"""Score one of mixq's multiple-choice tasks with lm-eval (EleutherAI's harness, its Hugging Face
backend) on an exported checkpoint, score it with eval.py on the same directory, and compare the
two item by item.

    python mixq.py --method rtn --wbits 4 --groupsize 64 --save out/q --export compressed-tensors out/ct
    python scripts/lm_eval_compare.py --ckpt out/ct --task capitals
    python scripts/lm_eval_compare.py --ckpt out/gptq --task compare --limit 100

The task reaches lm-eval as a custom task (its items in a JSONL file, a YAML beside it, in a
temporary directory): "Question: ...\\nAnswer:" then " " + each choice, acc and acc_norm as
eval.py defines them. lm-eval loads the directory with transformers: compressed-tensors with
CompressedTensorsConfig(dequantize=True) (transformers cannot run an asymmetric grid compressed),
GPTQ with GPTQModel's torch kernel in fp16 (its CPU kernels take fp16 and bf16 only). It runs in
a process of its own, because transformers imports Hugging Face's `kernels` package and mixq's
kernels.py has the same import name.

Needs: pip install lm-eval (and compressed-tensors, or gptqmodel and optimum, for the format).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def lm_eval_child(ckpt: str, include: str, task: str, limit, out: str):
    """In the child process: lm-eval's log-likelihoods of every choice of every item -> out."""
    import torch
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    qc = json.loads((Path(ckpt) / "config.json").read_text()).get("quantization_config") or {}
    dtype, extra = torch.float32, {}
    if qc.get("quant_method") == "gptq":  # GPTQModel's torch kernel: fp16 and bf16 only
        dtype = torch.float16
        extra["quantization_config"] = transformers.GPTQConfig(bits=qc["bits"], backend="torch")
    elif qc.get("quant_method") == "compressed-tensors":  # asymmetric grids run only dequantized
        extra["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, **extra)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    res = simple_evaluate(model=HFLM(pretrained=model.eval(), tokenizer=tok, batch_size=8),
                          tasks=[task], task_manager=TaskManager(include_path=include),
                          limit=limit, log_samples=True)
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    Path(out).write_text(json.dumps({"lls": lls, "results": res["results"][task],
                                     "dtype": str(dtype)}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an exported directory (compressed-tensors "
                   "or gptq) that transformers loads")
    p.add_argument("--task", default="capitals", help="a multiple-choice task: capitals, "
                   "compare, or jsonl:PATH")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items")
    p.add_argument("--child", nargs=3, metavar=("INCLUDE", "TASK", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return lm_eval_child(a.ckpt, *a.child[:2], a.limit, a.child[2])

    sys.path.insert(0, str(ROOT))
    import eval as metrics
    import model as llama
    spec = a.task if ":" in a.task else f"task:{a.task}"
    task = metrics.load_task(spec, "eval")
    if task.kind != "mc":
        raise SystemExit(f"error: {spec} is not a multiple-choice task")
    items = task.items[:a.limit]
    with tempfile.TemporaryDirectory() as tmp:
        data, name = Path(tmp) / "items.jsonl", f"mixq_{task.name}"
        data.write_text("".join(json.dumps({"question": it["question"], "choices": it["choices"],
                                            "answer": it["answer"]}) + "\n" for it in items))
        (Path(tmp) / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
        out = Path(tmp) / "lm_eval.json"
        # the child: this file as a script, so its sys.path starts at scripts/, not at mixq
        subprocess.run([sys.executable, __file__, "--ckpt", a.ckpt, "--child", tmp, name,
                        str(out)] + (["--limit", str(a.limit)] if a.limit else []), check=True,
                       cwd=tmp)
        theirs = json.loads(out.read_text())
    model, tok = llama.load(a.ckpt)
    ours = metrics.continuation_logprobs(model, tok, [
        (metrics.prompt(task, it), [" " + c for c in it["choices"]]) for it in items])

    def accuracy(lls):
        acc = sum(max(range(len(l)), key=l.__getitem__) == it["answer"]
                  for l, it in zip(lls, items))
        norm = sum(max(range(len(l)), key=lambda j: l[j] / len(it["choices"][j])) == it["answer"]
                   for l, it in zip(lls, items))
        return acc / len(items), norm / len(items)

    diffs = [abs(x - y) for lo, lt in zip(ours, theirs["lls"]) for x, y in zip(lo, lt)]
    picks = sum(max(range(len(lo)), key=lo.__getitem__) != max(range(len(lt)), key=lt.__getitem__)
                for lo, lt in zip(ours, theirs["lls"]))
    r = theirs["results"]
    print(f"\n{spec} on {a.ckpt}: {len(items)} items, lm-eval in {theirs['dtype']}\n")
    print("| scorer | acc | acc_norm |\n|---|---|---|")
    print(f"| lm-eval (its own metrics) | {r['acc,none']:.4f} | {r['acc_norm,none']:.4f} |")
    print("| lm-eval (its log-likelihoods, eval.py's rule) | %.4f | %.4f |"
          % accuracy(theirs["lls"]))
    print("| eval.py (mixq's kernels) | %.4f | %.4f |" % accuracy(ours))
    print(f"\nper choice |log p difference|: max {max(diffs):.2e}, mean "
          f"{sum(diffs) / len(diffs):.2e}; items whose top choice differs: {picks}")


if __name__ == "__main__":
    main()
