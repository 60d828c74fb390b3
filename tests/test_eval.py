"""eval.py: corpora, splits and the perplexity protocol."""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as metrics
import mixq
import model as llama
from conftest import ORACLE

ROOT = Path(__file__).resolve().parents[1]


class CharTokenizer:
    """Stands in for a Tokenizer in corpus tests: one id per byte."""
    def encode(self, text, bos=False):
        return list(text.encode("utf-8"))


def test_pydoc_splits_are_disjoint_and_cover_the_corpus():
    tok = CharTokenizer()
    all_ = metrics.corpus_tokens("pydoc", tok, "all")
    calib, ev = metrics.corpus_tokens("pydoc", tok, "calib"), metrics.corpus_tokens("pydoc", tok, "eval")
    assert torch.equal(torch.cat([calib, ev]), all_)
    assert len(ev) == len(all_) - int(0.9 * len(all_))


def test_text_and_wikitext_corpora(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert metrics.corpus_tokens(f"text:{tmp_path / 'a.txt'}", CharTokenizer()).tolist() == \
        list(b"hello world")
    (tmp_path / "wiki.test.raw").write_text(" = Title = \n test")
    (tmp_path / "wiki.train.raw").write_text("train text")
    assert metrics.corpus_text(f"wikitext2:{tmp_path}", "eval") == " = Title = \n test"
    assert metrics.corpus_text(f"wikitext2:{tmp_path}", "calib") == "train text"


def test_bad_corpus_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus 'c4'"):
        metrics.corpus_text("c4")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        metrics.corpus_text(f"text:{tmp_path / 'missing.txt'}")
    with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
        metrics.corpus_text(f"wikitext2:{tmp_path}")


def test_perplexity_follows_the_gptq_protocol(tiny_ckpt):
    ours, _ = llama.load(str(tiny_ckpt))
    tokens = torch.randint(0, 128, (3 * 50 + 17,), generator=torch.Generator().manual_seed(0))
    res = metrics.perplexity(ours, tokens, seqlen=50)
    assert res["windows"] == 3 and res["tokens"] == 3 * 49  # remainder of 17 dropped
    # the oracle: transformers' mean loss per window (49 predictions each), averaged
    losses = ORACLE.forward(tiny_ckpt, tokens[:150].view(3, 50))["loss"]
    assert res["ppl"] == pytest.approx(math.exp(losses.mean().item()), rel=1e-4)
    assert metrics.perplexity(ours, tokens, seqlen=50, windows=2)["windows"] == 2
    # no autograd graph, even for weights that require gradients (a model built in code)
    grad_on = []
    ours.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    ours.register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    metrics.perplexity(ours, tokens, seqlen=50, windows=1)
    assert grad_on == [False]
    with pytest.raises(ValueError, match="fewer than one window"):
        metrics.perplexity(ours, tokens[:40], seqlen=50)
    for seqlen, windows in [(1, None), (50, 0)]:  # no prediction in a window; no window
        with pytest.raises(ValueError, match="want a window of at least 2 tokens"):
            metrics.perplexity(ours, tokens, seqlen=seqlen, windows=windows)


@pytest.mark.parametrize("static,compile", [(False, False), (True, False), (False, True)])
def test_speed_reports_both_phases(tiny_ckpt, static, compile):
    ours, _ = llama.load(str(tiny_ckpt))
    s = metrics.speed(ours, prompt_len=16, new_tokens=4, repeats=1, static=static, compile=compile)
    assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0


def tiny_with_tokenizer(d):
    """A tiny random model with the embedded model's vocabulary and tokenizer, saved in d."""
    from shutil import copy
    from conftest import tiny_checkpoint
    tiny_checkpoint(d, vocab_size=49152)
    copy(llama.embedded_checkpoint() / "tokenizer.json", d / "tokenizer.json")
    return d


def test_cli_fast_decoding_flags_change_nothing_but_speed(tmp_path):
    # model.py and eval.py with --fuse (stacked projections) and --compile (a compiled static
    # step): the same greedy text and the same perplexity as without
    d = tiny_with_tokenizer(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    outs = []
    for flags in ([], ["--fuse", "--compile"]):
        gen = subprocess.run([sys.executable, str(ROOT / "model.py"), "--ckpt", str(d),
                              "--max-new-tokens", "8", *flags], capture_output=True, text=True)
        ev = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--ckpt", str(d), "--corpus",
                             f"text:{text}", "--seqlen", "64", "--json", str(tmp_path / "e.json"),
                             "--speed", *flags], capture_output=True, text=True)
        assert gen.returncode == 0 and ev.returncode == 0, gen.stderr + ev.stderr
        assert "[8 tokens in" in gen.stdout and "decode" in ev.stdout
        outs.append((gen.stdout.split("\n[")[0], json.loads((tmp_path / "e.json").read_text())))
    (text0, res0), (text1, res1) = outs
    assert text0 == text1 and res0["ppl"] == pytest.approx(res1["ppl"], rel=1e-5)


def test_cli_writes_json_on_a_text_file(tmp_path):
    d = tiny_with_tokenizer(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--ckpt", str(d),
                        "--corpus", f"text:{text}", "--seqlen", "64", "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ppl protocol" in r.stdout
    res = json.loads(out.read_text())
    assert {"ppl", "tokens", "windows", "seqlen", "corpus", "seconds"} <= set(res)
    assert res["seqlen"] == 64 and res["tokens"] == res["windows"] * 63


def test_cli_takes_mixq_eval_specs(tmp_path):
    # eval.py --eval reads mixq.py's --eval: a corpus and tasks in one list
    d = tiny_with_tokenizer(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "eval.py"), "--ckpt", str(d), "--seqlen", "64"]
    r = subprocess.run(cmd + ["--eval", "task:capitals", f"text:{text}", "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["corpus"] == f"text:{text}" and list(res["tasks"]) == ["task:capitals"]
    r = subprocess.run(cmd + ["--eval", "pydoc", f"text:{text}"], capture_output=True, text=True)
    assert r.returncode != 0 and "one corpus per run" in r.stderr


def test_cli_bad_corpus_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--corpus", "c4"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "unknown corpus 'c4'" in r.stderr


def test_progress_lines_stay_off_pipes_and_logs(capsys, tmp_path):
    class Uniform(torch.nn.Module):  # the same logits everywhere
        device = torch.device("cpu")

        def forward(self, x):
            return torch.zeros(*x.shape, 50)

    metrics.perplexity(Uniform(), torch.randint(0, 50, (100,)), 32, progress=True)
    assert capsys.readouterr().out == ""  # not a terminal: no line rewriting itself
    with open(tmp_path / "run.log", "w") as f:
        tee = mixq.Tee(io.StringIO(), f)
        tee.write("\r  window 1/3  running ppl 50.000")
        tee.write("ppl 50.000\n")
    assert (tmp_path / "run.log").read_text() == "ppl 50.000\n"
    assert tee.stream.getvalue().startswith("\r  window 1/3")
