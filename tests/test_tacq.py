"""TaCQ: the score, the global budget, the gradients (each against its paper version), and the
masked GPTQ."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import mixq
import model as llama
from conftest import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "m"
    tiny_checkpoint(d)
    return d


def calib(n=3, T=24, seed=0):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


def random_scores(seed, shapes=((8, 16), (4, 16), (16, 8))):
    g = torch.Generator().manual_seed(seed)
    # a few exact ties, as real fp16 scores have
    return {f"m{i}": (torch.rand(s, generator=g) * 8).round() / 8 for i, s in enumerate(shapes)}


@given(seed=st.integers(0, 10 ** 6), ratio=st.floats(0, 1))
def test_mask_is_the_stable_sort_selection(seed, ratio):
    # the threshold search keeps exactly what one stable descending sort of all scores keeps
    scores = random_scores(seed)
    fast, paper = mixq.global_top_k_masks(scores, ratio), mixq.global_top_k_paper(scores, ratio)
    assert all(torch.equal(fast[name], paper[name]) for name in scores)


@given(seed=st.integers(0, 10 ** 6), ratio=st.floats(0, 1))
def test_budget_is_exact_and_global(seed, ratio):
    scores = random_scores(seed)
    masks = mixq.global_top_k_masks(scores, ratio)
    N = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in masks.values()) == int(ratio * N)
    # global: every kept score >= every dropped score, whatever matrix it is in
    kept = torch.cat([s[masks[k]] for k, s in scores.items()])
    dropped = torch.cat([s[~masks[k]] for k, s in scores.items()])
    if kept.numel() and dropped.numel():
        assert kept.min() >= dropped.max()


@given(seed=st.integers(0, 10 ** 6), r1=st.floats(0, 1), r2=st.floats(0, 1))
def test_smaller_budget_is_a_subset(seed, r1, r2):
    lo, hi = sorted((r1, r2))
    scores = random_scores(seed)
    a, b = mixq.global_top_k_masks(scores, lo), mixq.global_top_k_masks(scores, hi)
    assert all((a[k] & ~b[k]).sum() == 0 for k in scores)


@given(seed=st.integers(0, 10 ** 6))
def test_score_is_zero_where_nothing_moves(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 10, generator=g)
    W[0] = 0
    Wref = W + 0.1 * torch.randn(6, 10, generator=g)
    Wref[:, 3] = W[:, 3]
    G = torch.rand(6, 10, generator=g)
    G[2] = 0
    S = mixq.tacq_score(W, Wref, G)
    assert (S[0] == 0).all() and (S[:, 3] == 0).all() and (S[2] == 0).all() and (S >= 0).all()


@pytest.mark.parametrize("keep_graphs", [False, True])
def test_gradients_equal_autograd_on_the_full_model(tiny, keep_graphs):
    # the block-by-block backward pass = autograd on the whole model, sample by sample, whether
    # each block runs again in the backward or its graph is kept from the forward
    model, _ = llama.load(str(tiny))
    xs = calib(3)
    answers = [torch.rand(len(x), generator=torch.Generator().manual_seed(i)) < 0.3
               for i, x in enumerate(xs)]
    for ans in (None, answers):
        G = mixq.gradient_magnitudes(model, xs, ans, log=lambda s: None, keep_graphs=keep_graphs)
        ref = mixq.gradient_magnitudes_paper(model, xs, ans)
        assert len(G) == 2 * 7  # every q/k/v/o/gate/up/down of both blocks
        for name in G:
            assert torch.allclose(G[name], ref[name], rtol=1e-5, atol=1e-8), name
    assert not any(p.requires_grad for p in model.parameters())  # left as they were


def test_kept_graphs_give_the_recomputed_gradients_exactly(tiny):
    # an fp32 model: the block run once with its graph kept is the very computation the
    # recomputing backward repeats, so G is the same bit for bit
    model, _ = llama.load(str(tiny))
    xs = calib(3)
    G = {kg: mixq.gradient_magnitudes(model, xs, log=lambda s: None, keep_graphs=kg)
         for kg in (False, True)}
    for name in G[False]:
        assert torch.equal(G[True][name], G[False][name]), name
    bf16, _ = llama.load(str(tiny), dtype="bf16")  # its blocks are not the fp32 ones
    with pytest.raises(ValueError, match="keep_graphs .* needs an fp32 model"):
        mixq.gradient_magnitudes(bf16, xs, log=lambda s: None, keep_graphs=True)


def test_sum_of_abs_bounds_abs_of_sum_and_loss_scale_keeps_the_mask(tiny):
    model, _ = llama.load(str(tiny))
    xs = calib(3)
    G = mixq.gradient_magnitudes(model, xs, log=lambda s: None)
    ws = [model.get_submodule(n).weight for n in G]
    for w in ws:
        w.requires_grad_(True)
    total = sum(mixq.next_token_loss(model(x[None]), x) for x in xs)
    for acc, g in zip(G.values(), torch.autograd.grad(total, ws)):
        assert (acc >= g.abs() - 1e-6).all()  # sum_s |g_s| >= |sum_s g_s|
    for w in ws:
        w.requires_grad_(False)
    G3 = mixq.gradient_magnitudes(model, xs, loss_scale=3.0, log=lambda s: None)
    W = {n: model.get_submodule(n).weight.data for n in G}
    s1 = {n: mixq.tacq_score(W[n], W[n].round(), G[n]) for n in G}
    s3 = {n: mixq.tacq_score(W[n], W[n].round(), G3[n]) for n in G}
    m1, m3 = mixq.global_top_k_masks(s1, 0.01), mixq.global_top_k_masks(s3, 0.01)
    assert all(torch.equal(m1[n], m3[n]) for n in G)


def test_calibration_order_does_not_change_the_scores(tiny):
    model, _ = llama.load(str(tiny))
    xs = calib(4)
    a = mixq.gradient_magnitudes(model, xs, log=lambda s: None)
    b = mixq.gradient_magnitudes(model, xs.flip(0), log=lambda s: None)
    assert all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-9) for n in a)


def test_answer_tokens_only_loss():
    logits = torch.randn(1, 5, 11)
    tokens = torch.tensor([1, 2, 3, 4, 5])
    answer = torch.tensor([False, False, False, True, True])
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[1:], reduction="none")
    assert torch.isclose(mixq.next_token_loss(logits, tokens, answer), nll[2:].mean())


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_ratio_zero_is_gptq_and_ratio_one_is_w(tiny, ratio):
    cfg = mixq.QuantConfig(wbits=3, groupsize=32, mse=True)
    xs = calib(3)
    ref, _ = llama.load(str(tiny))
    fp = {n: ref.get_submodule(n).weight.data.clone() for n in mixq.linear_names(ref)}
    mixq.quantize_model(ref, xs, "gptq", cfg, log=lambda s: None)
    model, _ = llama.load(str(tiny))
    scores = mixq.tacq_scores(model, xs, None, cfg, log=lambda s: None)
    masks = mixq.global_top_k_masks(scores, ratio)
    mixq.quantize_model(model, xs, "tacq", cfg, log=lambda s: None, masks=masks)
    for n in fp:
        got = model.get_submodule(n).weight.data
        want = ref.get_submodule(n).weight.data if ratio == 0 else fp[n].half().float()
        assert torch.equal(got, want), n


def _pipeline_rank(rank, world, ckpt, calib, answers, init, out):
    import torch.distributed as dist
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import tacq_pipeline
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    args = llama.ModelArgs.from_hf(llama.read_config(llama.resolve_ckpt(ckpt)))
    model, _ = llama.load(ckpt, only=tacq_pipeline.stage_tensors(args, rank, world))  # the rest: meta
    G = tacq_pipeline.pipeline_gradient_magnitudes(model, calib, answers, log=lambda s: None)
    torch.save(G, f"{out}-{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_pipeline_gradients_over_processes_equal_one_process(world, tmp_path):
    # scripts/tacq_pipeline.py: blocks split over `world` gloo processes (3 layers: stages of
    # 1 block, or of 1 and 2), answers masked; the union of the ranks' G is the one-process G
    import torch.multiprocessing as mp
    d = tmp_path / "m"
    tiny_checkpoint(d, num_hidden_layers=3)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 128, (T,), generator=g) for T in (12, 20)]
    answers = [torch.rand(len(c), generator=g) < 0.5 for c in calib]
    model, _ = llama.load(str(d))
    ref = mixq.gradient_magnitudes(model, calib, answers, log=lambda s: None)
    mp.spawn(_pipeline_rank, args=(world, str(d), calib, answers,
                                   f"file://{tmp_path / 'store'}", str(tmp_path / "G")),
             nprocs=world)
    G = {}
    for r in range(world):
        G |= torch.load(tmp_path / f"G-{r}.pt")
    assert sorted(G) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(G[name], ref[name], rtol=1e-5, atol=1e-7)


@given(seed=st.integers(0, 10 ** 6), ratio=st.floats(0, 0.2))
def test_circuit_location_counts_every_kept_weight_once(seed, ratio):
    shapes = {"q_proj": (8, 16), "down_proj": (16, 24)}
    g = torch.Generator().manual_seed(seed)
    masks = {f"layers.{li}.{'mlp' if m == 'down_proj' else 'self_attn'}.{m}":
             torch.rand(s, generator=g) < ratio for li in range(3) for m, s in shapes.items()}
    where = mixq.circuit_location(masks)
    total = sum(int(m.sum()) for m in masks.values())
    for key in ("by_module", "by_layer"):
        assert sum(v["kept"] for v in where[key].values()) == total
    assert set(where["by_layer"]) == {0, 1, 2} and set(where["by_module"]) == set(shapes)
    for module, (rows, cols) in shapes.items():
        kept = sum(int(m.sum()) for n, m in masks.items() if n.endswith(module))
        assert where["by_module"][module]["share"] == kept / (3 * rows * cols)


@pytest.mark.parametrize("answer_loss", [False, True])
def test_run_on_a_task_reports_where_the_circuit_is(tmp_path, answer_loss):
    # end to end through run(): task calibration by either protocol, the summary's circuit
    import json
    import shutil
    d = tiny_checkpoint(tmp_path / "m", vocab_size=49152)
    shutil.copy(llama.embedded_checkpoint() / "tokenizer.json", d / "tokenizer.json")
    cfg = mixq.QuantConfig(wbits=3, ratio=0.01)
    s = mixq.run(ckpt=str(d), method="tacq", cfg=cfg, calib="task:capitals", nsamples=2,
                 seqlen=32, evals=[], json_out=tmp_path / "s.json", answer_loss=answer_loss)
    assert s["calib"]["answer_loss"] is answer_loss
    where = json.loads((tmp_path / "s.json").read_text())["circuit"]
    model = llama.load(str(d))[0]
    kept = int(0.01 * sum(model.get_submodule(n).weight.numel() for n in mixq.linear_names(model)))
    assert s["kept_weights"] == kept
    for part in ("by_module", "by_layer"):
        assert sum(v["kept"] for v in where[part].values()) == kept
    assert set(where["by_layer"]) == {"0", "1"}  # JSON keys


def test_cached_scores_serve_another_ratio_and_refuse_other_settings(tmp_path, capsys):
    # --scores: the CLI layer keeps TaCQ's steps 1-3; another ratio reuses them and gives the
    # masks a fresh run gives; other calibration data is refused before any work
    import json
    import shutil
    d = tiny_checkpoint(tmp_path / "m", vocab_size=49152)
    shutil.copy(llama.embedded_checkpoint() / "tokenizer.json", d / "tokenizer.json")
    common = dict(ckpt=str(d), method="tacq", nsamples=2, seqlen=32, evals=[])
    scores = str(tmp_path / "scores")
    mixq.run(cfg=mixq.QuantConfig(wbits=3, ratio=0.01), scores_dir=scores, **common)
    assert "scores: reusing" not in capsys.readouterr().out
    cached = mixq.run(cfg=mixq.QuantConfig(wbits=3, ratio=0.02), scores_dir=scores,
                      json_out=tmp_path / "a.json", **common)
    assert "scores: reusing" in capsys.readouterr().out
    fresh = mixq.run(cfg=mixq.QuantConfig(wbits=3, ratio=0.02), json_out=tmp_path / "b.json",
                     **common)
    assert cached["kept_weights"] == fresh["kept_weights"] > 0
    assert cached["avg_bits"] == fresh["avg_bits"]
    circuit = [json.loads((tmp_path / f).read_text())["circuit"] for f in ("a.json", "b.json")]
    assert circuit[0] == circuit[1]  # the same 16-bit weights, layer by layer
    with pytest.raises(ValueError, match="holds scores for other settings"):
        mixq.run(cfg=mixq.QuantConfig(wbits=3, ratio=0.02), scores_dir=scores,
                 **(common | {"nsamples": 3}))
