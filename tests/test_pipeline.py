"""End to end: the layer-wise pipeline on a tiny random Llama and the CLI on the embedded model."""

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels
import mixq
import model as llama
from conftest import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]

CASES = {  # method -> options (tiny model: hidden 64, MLP 160; groups of 32 divide both)
    "rtn": mixq.QuantConfig(wbits=4, groupsize=32),
    "gptq": mixq.QuantConfig(wbits=3, groupsize=32, act_order=True, static_groups=True),
    "quantease": mixq.QuantConfig(wbits=2, groupsize=-1, iters=3, outliers=0.01),
    "spqr": mixq.QuantConfig(wbits=3),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "m"
    tiny_checkpoint(d)
    return d


@pytest.mark.parametrize("method", list(CASES))
def test_pipeline_save_load_same_logits(method, tiny_dir, tmp_path):
    model, _ = llama.load(str(tiny_dir))
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    lines = []
    res = mixq.quantize_model(model, None if method == "rtn" else calib, method, CASES[method],
                           log=lines.append)
    assert len(lines) == 2 and all("ETA" in ln for ln in lines)  # one progress line per block
    assert len(res) == 2 * 7
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, fp[k])]
    assert sorted(k.rsplit(".", 1)[0] for k in changed) == sorted(res)  # only the linears
    x = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    logits = model(x)
    gs = res["layers.0.self_attn.q_proj"]["groupsize"] if CASES[method].groupsize != -1 or \
        method == "spqr" else -1
    qc = {"quant_method": "mixq", "bits": CASES[method].wbits, "group_size": gs,
          "modules": sorted(res)}
    mixq.save_quantized(model, res, None, tmp_path / "q", qc)
    back, _ = llama.load(str(tmp_path / "q"))
    assert isinstance(back.layers[1].mlp.down_proj, kernels.QuantLinear)
    assert torch.equal(back(x), logits)
    avg = mixq.average_bits(res)
    if method == "rtn":  # 4 bits + two 16-bit statistics per 32 weights
        assert avg == 4 + 32 / 32
    kept = sum(r["kept"] for r in res.values())
    assert (kept > 0) == (method in ("quantease", "spqr"))


def test_a_3_bit_checkpoint_with_a_wrong_high_plane_is_refused(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    model, _ = llama.load(str(tiny_dir))
    res = mixq.quantize_model(model, None, "rtn", mixq.QuantConfig(wbits=3, groupsize=32),
                           log=lambda s: None)
    qc = {"quant_method": "mixq", "bits": 3, "group_size": 32, "modules": sorted(res)}
    mixq.save_quantized(model, res, None, tmp_path / "q", qc)
    f = tmp_path / "q" / "model.safetensors"
    t = load_file(str(f))
    name = "model.layers.1.mlp.down_proj.qweight_hi"
    t[name] = t[name][:-1].contiguous()  # one row of words short
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(llama.CheckpointError,
                       match=r"down_proj: .*qweight_hi \(\d+, 64\); 3-bit codes"):
        llama.load(str(tmp_path / "q"))


def test_a_checkpoint_in_another_packed_format_is_refused(tiny_dir, tmp_path):
    model, _ = llama.load(str(tiny_dir))
    res = mixq.quantize_model(model, None, "rtn", mixq.QuantConfig(wbits=3, groupsize=32),
                           log=lambda s: None)
    mixq.save_quantized(model, res, None, tmp_path / "q",
                     {"quant_method": "mixq", "bits": 3, "group_size": 32, "modules": sorted(res)})
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == kernels.FORMAT  # the writer names it
    cfg["quantization_config"]["format"] = "kernels.py packed v1"  # 3-bit codes in code order
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(llama.CheckpointError, match="packed as 'kernels.py packed v1'.*again"):
        llama.load(str(tmp_path / "q"))


def parse_cli(*argv):
    """mixq.py's command line -> (QuantConfig, Job), split as main() splits it."""
    a = vars(mixq.cli_parser().parse_args(argv))
    del a["saved"], a["log"]
    names = {f.name for f in dataclasses.fields(mixq.QuantConfig)}
    return (mixq.QuantConfig(**{k: v for k, v in a.items() if k in names}),
            mixq.Job(**{k: v for k, v in a.items() if k not in names}))


def test_the_cli_flags_are_the_config_fields_with_their_defaults():
    # no arguments: every default of QuantConfig and Job, as the Python API has them
    cfg, job = parse_cli()
    assert cfg == mixq.QuantConfig() and job == mixq.Job()
    cfg, job = parse_cli("--rounded", "--wbits", "2", "--outlier-threshold", "0.5", "--eval",
                         "--export", "gptq", "d", "--export-drop-kept", "--scores", "s",
                         "--eval-windows", "3", "--rotation", "random", "--sym")
    assert (cfg.relaxed, cfg.wbits, cfg.outlier_threshold, cfg.rotation, cfg.sym) == \
        (False, 2, 0.5, "random", True)
    assert (job.evals, job.export, job.drop_kept, job.scores_dir, job.eval_windows) == \
        ([], ["gptq", "d"], True, "s", 3)
    with pytest.raises(SystemExit):  # argparse refuses a value outside the field's choices
        parse_cli("--dtype", "int8")


def test_fingerprint_covers_what_changes_the_result(tiny_dir):
    model, _ = llama.load(str(tiny_dir))
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = mixq.QuantConfig(wbits=3)
    fp = lambda c=cfg, tokens=calib, dtype="fp32": mixq.run_fingerprint(  # noqa: E731
        mixq.Job(ckpt="x", dtype=dtype), model, "tacq", c, tokens)
    assert fp() == fp()
    assert fp()["format"] == kernels.FORMAT  # saved blocks hold packed codes
    for other in [fp(c=mixq.QuantConfig(wbits=3, act_order=True)), fp(dtype="bf16"),
                  fp(tokens=calib.flip(0)), fp(c=mixq.QuantConfig(wbits=3, percdamp=0.1))]:
        assert other != fp()


@pytest.mark.parametrize("group", mixq.SEQUENTIAL)
def test_input_stats_are_x_xt_over_n_shared_by_linears_that_read_one_input(group, tiny_dir):
    model, _ = llama.load(str(tiny_dir))
    block = model.layers[1]
    xs = [torch.randn(1, T, model.args.dim, generator=torch.Generator().manual_seed(T))
          for T in (7, 12)]
    inputs = {name: [] for name in group}  # what each linear really reads, captured directly
    hooks = [block.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: inputs[n].append(i[0].reshape(-1, i[0].shape[-1])))
        for n in group]
    for x in xs:
        block(x, *model.rope(0, x.shape[1]))
    for h in hooks:
        h.remove()
    stats, _ = mixq.collect_input_stats(block, group, xs, lambda x: model.rope(0, x.shape[1]),
                                        "cpu")
    for name in group:
        X = torch.cat(inputs[name])  # (N, n)
        torch.testing.assert_close(stats[name].sigma, X.T @ X / len(X), rtol=1e-5, atol=1e-6)
        assert stats[name].count == len(X)
    assert len({id(s) for s in stats.values()}) == 1  # q, k, v (gate, up): one Sigma
    # the group's products were skipped (their outputs are unread); afterwards every linear
    # is itself again: the same outputs as before
    assert all("forward" not in block.get_submodule(n).__dict__ for n in group)
    x = xs[0]
    again = {}
    hooks = [block.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: again.setdefault(n, o)) for n in group]
    block(x, *model.rope(0, x.shape[1]))
    for h in hooks:
        h.remove()
    for n in group:
        lin = block.get_submodule(n)
        torch.testing.assert_close(again[n], torch.nn.functional.linear(
            inputs[n][0], lin.weight).reshape(again[n].shape))


def true_sequential_by_full_forwards(model, calib, cfg):
    """True-sequential GPTQ as plainly as it can be written: for each group of each block, run
    the whole block on every input with hooks that collect Sigma, then quantize the group."""
    xs = [model.embed_tokens(c[None]) for c in calib]
    for block in model.layers:
        for group in mixq.SEQUENTIAL:
            stats = {name: mixq.InputStats(block.get_submodule(name).in_features, "cpu")
                     for name in group}
            hooks = [block.get_submodule(n).register_forward_pre_hook(
                lambda m, a, n=n: stats[n].add(a[0])) for n in group]
            for x in xs:
                block(x, *model.rope(0, x.shape[1]))
            for h in hooks:
                h.remove()
            for name in group:
                lin = block.get_submodule(name)
                with mixq.one_thread():  # as the pipeline solves (the BLAS's sums follow threads)
                    qz = mixq.gptq(lin.weight.data, 2 * stats[name].sigma, cfg)
                lin.weight.data = qz.dequantize()
        xs = [block(x, *model.rope(0, x.shape[1])) for x in xs]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10 ** 6), n=st.integers(1, 700), ts=st.lists(st.integers(1, 40),
       min_size=1, max_size=3), rows=st.sampled_from([256, 64, 32]))
def test_input_stats_from_the_upper_triangle_are_the_full_products_exactly(seed, n, ts, rows):
    # on the CPU InputStats multiplies only blocks of at least GRAM_ROWS rows on and above the
    # diagonal and mirrors them: the very numbers of the plain running mean of x^T x (read
    # between two updates too), and exactly symmetric once it takes more than one block
    g = torch.Generator().manual_seed(seed)
    plain, count = torch.zeros(n, n), 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mixq, "GRAM_ROWS", rows)
        stats = mixq.InputStats(n, "cpu")
        for t in ts:
            x = torch.randn(1, t, n, generator=g) * torch.rand(n, generator=g)
            stats.add(x)
            x = x[0]
            plain.mul_(count / (count + t)).add_(x.T @ x / (count + t))
            count += t
            assert torch.equal(stats.sigma, plain)
            assert n < 2 * rows or torch.equal(stats.sigma, stats.sigma.T)


@pytest.mark.parametrize("down_hook", [False, True])
def test_replayed_passes_give_what_full_forwards_give(tiny_dir, down_hook):
    # quantize_block replays the attention's and the MLP's outputs instead of recomputing them;
    # a pre-hook on down_proj (ResQ's online Hadamard is one) must run once, not twice
    calib = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    cfg = mixq.QuantConfig(wbits=3, groupsize=32)
    models = [llama.load(str(tiny_dir))[0] for _ in range(2)]
    if down_hook:
        for m in models:
            for b in m.layers:
                b.mlp.down_proj.register_forward_pre_hook(lambda mod, a: (a[0].flip(-1) * 2,))
    mixq.quantize_model(models[0], calib, "gptq", cfg, log=lambda s: None)
    true_sequential_by_full_forwards(models[1], calib, cfg)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name


def test_calibration_never_touches_the_evaluation_split():
    class Tok:
        def encode(self, text, bos=False):
            return list(text.encode())
    import eval as metrics
    calib = mixq.calibration_windows("pydoc", Tok(), 64, 256, seed=0)
    n_calib = len(metrics.corpus_tokens("pydoc", Tok(), "calib"))
    assert calib.shape == (64, 256)
    # every window is a piece of the calibration split (bytes here, so a substring search)
    calib_split = bytes(metrics.corpus_tokens("pydoc", Tok(), "calib").tolist())
    assert n_calib < len(metrics.corpus_tokens("pydoc", Tok(), "all"))  # an evaluation split remains
    assert all(bytes(w.tolist()) in calib_split for w in calib)
    assert len({tuple(w.tolist()) for w in calib}) > 60  # random offsets, not one window


def test_cli_rtn_on_embedded_saves_a_checkpoint_eval_reproduces(tmp_path, embedded):
    # groups of 128, the field's default: the 576 inputs of q/k/v, o and gate/up hold 4.5 of
    # them (a partial last group of 64), down_proj's 1536 inputs 12
    out, js = tmp_path / "q", tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "mixq.py"), "--method", "rtn", "--wbits", "4",
                        "--groupsize", "128", "--eval", "pydoc", "--eval-windows", "2", "--save",
                        str(out), "--json", str(js), "--log", str(tmp_path / "run.log")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lins = [m for name, m in embedded[0].named_modules() if name.endswith("_proj")]
    groups = sum(m.out_features * math.ceil(m.in_features / 128) for m in lins)
    avg_bits = 4 + 32 * groups / sum(m.weight.numel() for m in lins)  # fp16 scale and zero
    assert f"| rtn W4 g128 | {avg_bits:.3f} | 16.00 |" in r.stdout
    log = (tmp_path / "run.log").read_text()
    assert "python mixq.py --method rtn" in log.splitlines()[0] and r.stdout in log
    assert re.search(r"^\d\d:\d\d:\d\d block 30/30", r.stdout, re.M)  # the time of day
    res = json.loads(js.read_text())
    assert res["avg_bits"] == pytest.approx(avg_bits, rel=1e-12) and res["method"] == "rtn"
    assert [b["block"] for b in res["blocks"]] == list(range(30))
    q_ppl, fp_ppl = res["quant"]["pydoc"]["ppl"], res["fp"]["pydoc"]["ppl"]
    assert fp_ppl < q_ppl < 2 * fp_ppl  # 4-bit g128 on a model whose weights lie on a 4-bit grid
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["method"] == "rtn" and cfg["bits"] == 4 and cfg["avg_bits"] == res["avg_bits"]
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--ckpt", str(out), "--windows",
                        "2", "--json", str(tmp_path / "e.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["ppl"] == pytest.approx(q_ppl, rel=1e-6)


@pytest.mark.parametrize("args,msg", [
    (["--method", "awq"], "invalid choice: 'awq'"),
    (["--groupsize", "0"], "--groupsize 0: use a positive size or -1"),
    (["--calib", "text:/nonexistent.txt"], "does not exist"),
    (["--wbits", "5", "--save", "/tmp/x"], "can be evaluated but not saved"),
    (["--nsamples", "0"], "--nsamples 0: want at least 1"),
    (["--ratio", "2"], "--ratio 2.0: want a fraction in [0, 1]"),
    (["--method", "resq", "--abits", "1"], "--abits 1: want 2-16 bits"),
    (["--method", "resq", "--groupsize", "64"], "ResQ quantizes weights per output channel"),
    (["--method", "rtn", "--act-order"], "--act-order: RTN has no column order"),
    (["--method", "gptq", "--act-order", "--groupsize", "64", "--save", "/tmp/x"],
     "needs --static-groups"),
    (["--method", "quantease", "--outliers", "0.01", "--act-order"],
     "--act-order: outlier-aware QuantEase has no column order"),
    (["--method", "quantease", "--act-order", "--groupsize", "64", "--save", "/tmp/x"],
     "needs --static-groups"),
    (["--method", "resq", "--act-order"], "ResQ's GPTQ takes the low columns first"),
    (["--method", "resq", "--wbits", "3", "--save", "/tmp/x"], "can be evaluated but not saved"),
    (["--method", "resq", "--export", "gptq", "/tmp/x"], "no other tool runs ResQ"),
])
def test_cli_bad_input(args, msg, tmp_path):
    # "/tmp/x" stands for an output path: a new directory under tmp_path, so that whatever
    # /tmp/x holds on this machine plays no part
    args = [str(tmp_path / "out") if a == "/tmp/x" else a for a in args]
    r = subprocess.run([sys.executable, str(ROOT / "mixq.py")] + args, capture_output=True,
                       text=True)
    assert r.returncode != 0 and msg in r.stderr


def test_save_never_replaces_what_mixq_did_not_write(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for target, msg in [("file", "is a file"), ("other", "holds other files"),
                        ("hf", "mixq did not write")]:
        with pytest.raises(ValueError, match=msg):
            mixq.check_save_dir(tmp_path / target)
    with pytest.raises(ValueError, match="holds other files"):  # the writer itself refuses too
        with llama.atomic_dir(tmp_path / "other") as tmp:
            (tmp / "config.json").write_text("{}")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "mixq"}}))
    (tmp_path / "mine").mkdir()  # an earlier mixq checkpoint with a file of the user's in it
    (tmp_path / "mine" / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "mixq"}}))
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"files mixq did not write \(notes.txt\)"):
        mixq.check_save_dir(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    for ok in ("new", "empty", "old"):
        mixq.check_save_dir(tmp_path / ok)
        with llama.atomic_dir(tmp_path / ok) as tmp:
            (tmp / "config.json").write_text("{}")
        assert sorted(p.name for p in (tmp_path / ok).iterdir()) == ["config.json"]


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tiny_dir, tmp_path):
    cfg = mixq.QuantConfig(wbits=3, groupsize=32)
    calib = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    fp = {"run": 1}
    whole, _ = llama.load(str(tiny_dir))
    ref = mixq.quantize_model(whole, calib, "gptq", cfg, log=lambda s: None)

    def killed_after_first_block(line):
        if " block  1/" in line:
            raise KeyboardInterrupt  # as if the process were killed once block 0 was saved

    model, _ = llama.load(str(tiny_dir))
    with pytest.raises(KeyboardInterrupt):
        mixq.quantize_model(model, calib, "gptq", cfg, log=killed_after_first_block,
                         resume=str(tmp_path / "st"), fingerprint=fp)
    assert (tmp_path / "st" / "block-0000.safetensors").exists()
    assert not (tmp_path / "st" / "block-0001.safetensors").exists()
    lines = []
    model, _ = llama.load(str(tiny_dir))  # a fresh process: the fp model again
    res = mixq.quantize_model(model, calib, "gptq", cfg, log=lines.append,
                           resume=str(tmp_path / "st"), fingerprint=fp)
    assert "(resumed)" in lines[0] and "(resumed)" not in lines[1]
    for k, v in whole.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    for name in ref:
        for t in ref[name]["tensors"]:
            assert torch.equal(res[name]["tensors"][t], ref[name]["tensors"][t])
    with pytest.raises(ValueError, match="other settings.*run"):
        mixq.quantize_model(model, calib, "gptq", cfg, log=lambda s: None,
                         resume=str(tmp_path / "st"), fingerprint={"run": 2})


def test_cli_resume_refuses_other_settings_before_the_fp_evaluation(tmp_path, embedded):
    st = tmp_path / "st"
    st.mkdir()
    fingerprint = mixq.run_fingerprint(mixq.Job(method="rtn"), embedded[0], "rtn",
                                       mixq.QuantConfig(wbits=4), None)
    (st / "state.json").write_text(json.dumps({"fingerprint": fingerprint, "blocks_done": 3}))
    r = subprocess.run([sys.executable, str(ROOT / "mixq.py"), "--method", "rtn", "--wbits", "3",
                        "--resume", str(st)], capture_output=True, text=True)
    assert r.returncode != 0 and "holds a run with other settings" in r.stderr
    assert "options.wbits: 4 there, 3 now" in r.stderr and "fp model" not in r.stdout

def test_mixq_imports_and_quantizes_without_triton():
    # the algorithms need only torch: with triton unimportable, mixq imports, quantizes a layer
    # and packs it; only the GPU paths need triton
    code = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch, mixq
W = torch.randn(16, 64, dtype=torch.float64)
X = torch.randn(64, 256, dtype=torch.float64)
for method in ("gptq", "quantease", "rtn"):
    qz = mixq.solve(method, W, X @ X.T / 256, mixq.QuantConfig(wbits=3, groupsize=32, iters=2))
    assert mixq.packed_tensors(qz)["qweight"].dtype == torch.int32
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_block_records_hold_seconds_memory_error_and_damping_and_resume_keeps_them(tiny_dir,
                                                                                   tmp_path):
    cfg = mixq.QuantConfig(wbits=3, groupsize=32, percdamp=0.02)
    calib = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    model, _ = llama.load(str(tiny_dir))
    res = mixq.quantize_model(model, calib, "gptq", cfg, log=lambda s: None,
                              resume=str(tmp_path / "st"), fingerprint={"run": 1})
    records = mixq.block_records(res)
    assert [r["block"] for r in records] == [0, 1]
    for r in records:
        assert r["seconds"] > 0 and r["peak_memory_gb"] > 0
        assert sorted(r["linears"]) == sorted(mixq.LINEARS)
        for lin in r["linears"].values():
            assert lin["damping"] == pytest.approx(0.02) and 0 < lin["rel_err"] < 1
            assert 0 < lin["solve_seconds"] <= r["seconds"] and lin["kept"] == 0
    model, _ = llama.load(str(tiny_dir))  # every block done: all read back from --resume
    again = mixq.quantize_model(model, calib, "gptq", cfg, log=lambda s: None,
                                resume=str(tmp_path / "st"), fingerprint={"run": 1})
    assert mixq.block_records(again) == records
