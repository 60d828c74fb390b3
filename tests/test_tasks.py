"""Tasks: built-in generators, jsonl files, lm-eval-style scoring, task calibration data."""

import json

import pytest
import torch

import eval as metrics
import mixq
import model as llama


@pytest.mark.parametrize("name", list(metrics.TASKS))
def test_builtin_tasks_are_deterministic_with_disjoint_splits(name):
    a, b = metrics.load_task(f"task:{name}", "eval"), metrics.load_task(f"task:{name}", "eval")
    assert a.items == b.items and len(a.items) >= 40
    calib = metrics.load_task(f"task:{name}", "calib").items
    questions = {i["question"] for i in a.items}
    assert not questions & {i["question"] for i in calib}
    for item in a.items:
        if a.kind == "mc":
            assert 0 <= item["answer"] < len(item["choices"])
            assert len(set(item["choices"])) == len(item["choices"])


def test_jsonl_formats_and_errors(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1}) + "\n")
    assert metrics.load_task(f"jsonl:{mc}").kind == "mc"
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"question": "q", "answer": "so 6 * 7 = 42 #### 42"}) + "\n")
    t = metrics.load_task(f"jsonl:{gen}")
    assert t.kind == "gen" and metrics.gold_answer(t.items[0]) == "42"
    txt = tmp_path / "t.jsonl"
    txt.write_text(json.dumps({"text": "hello"}) + "\n")
    assert metrics.load_task(f"jsonl:{txt}").kind == "text"
    with pytest.raises(FileNotFoundError):
        metrics.load_task(f"jsonl:{tmp_path / 'none.jsonl'}")
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        metrics.load_task("task:mmlu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2: not JSON"):
        metrics.load_task(f"jsonl:{bad}")
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" +
                   json.dumps({"question": "q2"}) + "\n")  # the second item lacks its answer
    with pytest.raises(ValueError, match="line 2: want fields question/answer"):
        metrics.load_task(f"jsonl:{bad}")


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    from shutil import copy
    from conftest import tiny_checkpoint
    d = tmp_path_factory.mktemp("t") / "m"
    tiny_checkpoint(d, vocab_size=49152)
    copy(llama.embedded_checkpoint() / "tokenizer.json", d / "tokenizer.json")
    return llama.load(str(d))


def test_batched_choice_scores_equal_one_at_a_time(tiny_with_tokenizer):
    model, tok = tiny_with_tokenizer
    ctx, choices = "Question: What is the capital of Peru?\nAnswer:", [" Lima", " Buenos Aires"]
    [batched] = metrics.continuation_logprobs(model, tok, [(ctx, choices)])
    for c, got in zip(choices, batched):
        ids, n = tok.encode(ctx + c), len(tok.encode(ctx))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
        want = sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids)))
        assert got == pytest.approx(want, abs=1e-4)


def test_items_scored_together_get_their_scores_alone():
    # items whose longest sequence has the same length share a forward; each keeps its own
    # padding, so every score is the one it gets alone, up to the BLAS's summation order (a
    # CPU's GEMM may split its sums differently for more rows)
    model, tok = llama.load()
    task = metrics.load_task("task:capitals")
    items = [(metrics.prompt(task, it), [" " + c for c in it["choices"]]) for it in task.items[:12]]
    alone = [metrics.continuation_logprobs(model, tok, [item])[0] for item in items]
    lengths = [max(len(tok.encode(c + x)) for x in xs) for c, xs in items]
    assert len(set(lengths)) < len(items)  # some items do share a forward
    for max_tokens in (1024, 40, 1):  # one forward per length, several, one per item
        together = metrics.continuation_logprobs(model, tok, items, max_tokens)
        assert [len(s) for s in together] == [len(s) for s in alone]
        for got, want in zip(together, alone):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_multiple_choice_and_generation_scoring(tiny_with_tokenizer, tmp_path):
    model, tok = tiny_with_tokenizer
    q = "Which?"
    prompt = f"Question: {q}\nAnswer:"
    [lls] = metrics.continuation_logprobs(model, tok, [(prompt, [" alpha", " b"])])
    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"question": q, "choices": ["alpha", "b"],
                             "answer": int(lls[1] > lls[0])}) + "\n")
    assert metrics.task_accuracy(model, tok, f"jsonl:{f}")["acc"] == 1.0
    out = model.generate(tok.encode(prompt), 8, stop_ids=tok.stop_ids() + tok.encode("\n"))
    greedy = tok.decode(out).split("\n")[0].strip()
    g = tmp_path / "gen.jsonl"
    lines = [{"question": q, "answer": greedy}, {"question": q, "answer": greedy + "x"}]
    g.write_text("\n".join(json.dumps(x) for x in lines))
    assert metrics.task_accuracy(model, tok, f"jsonl:{g}")["exact_match"] == 0.5


@pytest.mark.parametrize("name,seed", [("capitals", 0), ("arith", 1), ("compare", 2)])
def test_task_calibration_is_one_whole_item_per_sample(name, seed):
    # TaCQ's protocol: each sample is one item, prompt and answer, in a seeded order, until
    # the next item would pass the token budget nsamples * seqlen; the loss covers every token
    _, tok = llama.load()
    samples, answers = mixq.calibration_data(f"task:{name}", tok, 4, 64, seed=seed)
    assert answers is None
    task = metrics.load_task(f"task:{name}", "calib")
    whole = {tuple(tok.encode("".join(metrics.calibration_text(task, i)))) for i in task.items}
    assert all(tuple(s.tolist()) in whole for s in samples)
    assert len({tuple(s.tolist()) for s in samples}) == len(samples)  # no item twice
    used = sum(len(s) for s in samples)
    assert 4 * 64 - max(map(len, whole)) < used <= 4 * 64  # the next item did not fit
    other, _ = mixq.calibration_data(f"task:{name}", tok, 4, 64, seed=seed + 10)
    assert [s.tolist() for s in other] != [s.tolist() for s in samples]  # the seed orders


def test_task_calibration_marks_the_answer_tokens():
    _, tok = llama.load()
    windows, answers = mixq.calibration_data("task:capitals", tok, 4, 64, seed=0, answer_loss=True)
    assert len(windows) == 4 and all(len(w) == 64 for w in windows)
    task = metrics.load_task("task:capitals", "calib")
    capitals = {i["choices"][i["answer"]] for i in task.items}
    for w, a in zip(windows, answers):
        assert a.any() and not a.all()
        marked = tok.decode(w[a].tolist())
        assert any(c in marked for c in capitals) and "Question" not in marked
