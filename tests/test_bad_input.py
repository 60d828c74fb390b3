"""Bad input through the command lines: each case must stop with a message that names the problem,
before any long work (no fp evaluation printed), and leave nothing half-written behind."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as llama
from conftest import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def jsonl(path, *items):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


MC = {"question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": 0}

# (what the file holds, what the message must say)
BAD_EVAL_ITEMS = [
    ({**MC, "answer": 5}, "line 2: answer 5: want the index of the right choice, 0 to 1"),
    ({**MC, "answer": -1}, "answer -1: want the index"),
    ({**MC, "answer": 0.5}, "answer 0.5: want the index"),
    ({**MC, "answer": "Paris"}, "answer 'Paris': want the index"),
    ({**MC, "answer": True}, "answer True: want the index"),
    ({**MC, "choices": "Paris"}, "choices 'Paris': want a list of at least two strings"),
    ({**MC, "choices": []}, "choices []: want a list of at least two strings"),
    ({**MC, "choices": ["Paris", 3]}, "want a list of at least two strings"),
    ({**MC, "question": 7}, "question 7: want a string"),
    ({"question": "Capital?"}, "line 2: want fields question/choices/answer"),
    ("{not json", "line 2: not JSON"),
]


@pytest.mark.parametrize("item,msg", BAD_EVAL_ITEMS)
def test_bad_eval_items_are_refused_before_loading(tmp_path, item, msg):
    f = jsonl(tmp_path / "t.jsonl", MC, item)
    r = run("mixq.py", "--method", "rtn", "--eval", f"jsonl:{f}")
    assert r.returncode != 0 and f"--eval jsonl:{f}" in r.stderr and msg in r.stderr, r.stderr
    assert "fp model" not in r.stdout
    r = run("eval.py", "--tasks", f"jsonl:{f}")  # eval.py checks its tasks the same way
    assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("item,msg", [({"text": 5}, "text 5: want a non-empty string"),
                                      ({"text": ""}, "text '': want a non-empty string"),
                                      ({"question": "q", "answer": None},
                                       "answer None: want a string or a number")])
def test_bad_calibration_items_are_refused(tmp_path, item, msg):
    first = {k: "x" for k in item}
    f = jsonl(tmp_path / "c.jsonl", first, item)
    r = run("mixq.py", "--calib", f"jsonl:{f}")
    assert r.returncode != 0 and f"--calib jsonl:{f}" in r.stderr and msg in r.stderr, r.stderr


def test_bad_corpora_and_output_paths(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    (tmp_path / "out").mkdir()
    cases = [
        (["--calib", f"text:{short}"], "need > 512"),  # counted before the fp evaluation
        (["--calib", "text:/bin/ls"], "is not UTF-8 text"),
        (["--method", "rtn", "--json", tmp_path / "out"], "is a directory: give a file name"),
        (["--method", "rtn", "--json", "/proc/mixq/out.json"], "cannot write in /proc"),
    ]
    for args, msg in cases:
        r = run("mixq.py", *args)
        assert r.returncode != 0 and msg in r.stderr, (args, r.stderr)
        assert "fp model" not in r.stdout
    r = run("eval.py", "--json", tmp_path / "out")
    assert r.returncode != 0 and "is a directory" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "short.txt"]  # no temp files


def test_resume_and_save_never_mix_into_the_users_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = run("mixq.py", "--method", "rtn", "--resume", mine)
    assert r.returncode != 0 and "holds files that are not an earlier run's (notes.txt)" in r.stderr
    (mine / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "mixq"}}))
    r = run("mixq.py", "--method", "rtn", "--save", mine)
    assert r.returncode != 0 and "files mixq did not write (notes.txt)" in r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]


def tiny_with_tokenizer(d):
    tiny_checkpoint(d, vocab_size=49152)
    shutil.copy(llama.embedded_checkpoint() / "tokenizer.json", d / "tokenizer.json")
    return d


def test_bad_checkpoints_name_the_file_and_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    d = tiny_with_tokenizer(tmp_path / "nan")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    r = run("mixq.py", "--ckpt", d, "--method", "rtn")
    assert r.returncode != 0 and "non-finite weights (NaN or Inf) in layers.1.mlp.up_proj.weight" \
        in r.stderr and "fp model" not in r.stdout
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    r = run("mixq.py", "--ckpt", d, "--method", "rtn")  # the tensors hold 160
    assert r.returncode != 0 and "gate_proj.weight' has shape (160, 64)" in r.stderr
    (d / "config.json").write_text(json.dumps(cfg))
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])
    r = run("mixq.py", "--ckpt", d, "--method", "rtn")
    assert r.returncode != 0 and "truncated" in r.stderr and "Traceback" not in r.stderr
    for text, msg in [("{not json", "config.json is not JSON"),
                      ("[1, 2]", "config.json holds a list, not a JSON object")]:
        (d / "config.json").write_text(text)
        for script in ("mixq.py", "eval.py", "model.py"):
            r = run(script, "--ckpt", d)
            assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, \
                (script, r.stderr)


def test_a_gguf_cut_in_half_is_called_truncated(tmp_path):
    half = tmp_path / "half.gguf"
    data = llama.embedded_gguf().read_bytes()
    half.write_bytes(data[:len(data) // 2])
    r = run("model.py", "--ckpt", half, "--prompt", "hi")
    assert r.returncode != 0 and "not a readable GGUF file, truncated" in r.stderr
    assert "Traceback" not in r.stderr


def test_json_is_strict_even_with_a_nan(tmp_path):
    import eval as metrics
    metrics.write_json(tmp_path / "s.json", {"ppl": float("nan"), "runs": [float("inf"), 1.5]})
    text = (tmp_path / "s.json").read_text()
    assert json.loads(text) == {"ppl": "nan", "runs": ["inf", 1.5]} and "NaN" not in text


def test_outputs_get_the_usual_file_modes(tmp_path):
    d = tiny_checkpoint(tmp_path / "t")
    llama.save_hf(llama.load(str(d))[0], None, tmp_path / "out")
    import os
    umask = os.umask(0o022)  # as most systems set it (and back afterwards)
    try:
        llama.save_hf(llama.load(str(d))[0], None, tmp_path / "out2")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out2").iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}  # not safetensors' 0600
    assert (tmp_path / "out2").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert torch.equal(llama.load(str(tmp_path / "out"))[0].embed_tokens.weight,
                       llama.load(str(d))[0].embed_tokens.weight)


def test_non_finite_statistics_stop_at_the_layer_that_sees_them(tmp_path):
    import mixq
    model, _ = llama.load(str(tiny_checkpoint(tmp_path / "t")))
    model.layers[0].mlp.down_proj.weight.data[0] = 3e38  # finite weights, infinite activations
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"layers.1.self_attn.q_proj: its calibration inputs "
                                         r"hold NaN or Inf.*not from the damping"):
        mixq.quantize_model(model, calib, "gptq", mixq.QuantConfig(wbits=3), log=lambda s: None)
    model, _ = llama.load(str(tmp_path / "t"))  # (run() refuses a NaN weight before this point)
    model.layers[1].self_attn.o_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers.1.self_attn.q_proj: its loss gradient holds NaN"):
        mixq.gradient_magnitudes(model, calib, log=lambda s: None)
