"""model.py against transformers (the oracle), plus loading and generation behaviour."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import model as llama
from conftest import ORACLE, tiny_checkpoint


def test_tiny_gqa_logits_equal_transformers(tiny_ckpt):
    ours, _ = llama.load(str(tiny_ckpt))
    ids = torch.randint(0, 128, (2, 80), generator=torch.Generator().manual_seed(1))
    theirs = ORACLE.forward(tiny_ckpt, ids)
    # the weights are small (std 0.02), so check RoPE's frequencies directly too
    torch.testing.assert_close(llama.rope_frequencies(ours.args), theirs["inv_freq"])
    diff = (ours(ids) - theirs["logits"]).abs().max().item()
    assert diff < 1e-3, diff


def test_llama31_rope_scaling_logits_equal_transformers(tmp_path):
    # original context 64 so that the wavelengths (6.3, 19.9, 62.8, 199, ...) at head_dim 16 fall
    # in all three regimes: shorter than 64/4 (kept), longer than 64/1 (divided by 8), between
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    d = tiny_checkpoint(tmp_path / "t", rope_scaling=rs, rope_theta=10000.0)
    ours, _ = llama.load(str(d))
    assert ours.args.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(2))
    theirs = ORACLE.forward(d, ids)
    inv = llama.rope_frequencies(ours.args)
    torch.testing.assert_close(inv, theirs["inv_freq"])  # the oracle's
    plain = llama.rope_frequencies(llama.ModelArgs(**{**vars(ours.args), "rope_scaling": None}))
    wavelen = 2 * math.pi / plain
    assert (inv == plain)[wavelen < 16].all() and (inv == plain / 8)[wavelen > 64].all()
    assert ((inv != plain) & (inv != plain / 8)).any()  # the interpolated band is exercised
    diff = (ours(ids) - theirs["logits"]).abs().max().item()
    assert diff < 1e-3, diff


def test_tied_embeddings_logits_equal_transformers(tmp_path):
    d = tiny_checkpoint(tmp_path / "t", tie_word_embeddings=True)
    ours, _ = llama.load(str(d))
    assert ours.lm_head.weight is ours.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(3))
    assert (ours(ids) - ORACLE.forward(d, ids)["logits"]).abs().max().item() < 1e-3


def test_config_variants_map_the_same():
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=160, vocab_size=128)
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    old = llama.ModelArgs.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": rs})
    new = llama.ModelArgs.from_hf({**base, "rope_parameters": {**rs, "rope_theta": 500000.0}})
    assert old == new and old.rope_theta == 500000.0
    plain = llama.ModelArgs.from_hf({**base, "rope_parameters": {"rope_type": "default",
                                                             "rope_theta": 1e4}})
    assert plain.rope_scaling is None and plain.head_dim == 16
    assert llama.ModelArgs.from_hf(llama.ModelArgs.from_hf(base).to_hf()) == llama.ModelArgs.from_hf(base)


def test_embedded_smollm2_logits_equal_transformers(embedded):
    import eval as metrics
    ours, tok = embedded
    path = llama.embedded_gguf()
    ids = metrics.corpus_tokens("pydoc", tok, "all")[:128][None]
    # transformers reads the GGUF itself: its own dequantization and q/k un-permutation
    theirs = ORACLE.forward(path.parent, ids, gguf_file=path.name)["logits"]
    with torch.no_grad():
        diff = (ours(ids) - theirs).abs().max().item()
    assert diff < 1e-3, diff


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_tokenizer_equals_transformers_gguf(embedded, text):
    assert [embedded[1].encode(text)] == ORACLE.tokenize(llama.embedded_gguf(), [text])


# a byte-level vocabulary whose merges tell the pre-tokenizers apart: "2024" is one token in
# GPT-2's pieces and two in Llama 3's ("202", "4"); runs of spaces and newlines merge too
TINY_MERGES = ["2 0", "2 4", "20 24", "20 2", "\u0120 \u0120", "\u010a \u010a",
               "\u0120\u0120 \u0120", "\u0120 2", "' S", "h e", "he l", "\u0120 h"]


def tiny_gguf_vocabulary(path, pre):
    """A GGUF file holding a tokenizer (the 256 byte symbols + TINY_MERGES) and one tensor, and
    the tokenizer part of its metadata, as model.read_gguf reads it."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from tokenizers.pre_tokenizers import ByteLevel
    tokens = sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in TINY_MERGES]
    tokens += ["<|begin_of_text|>", "<|end_of_text|>"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": TINY_MERGES,
            "tokenizer.ggml.token_type": [1] * (len(tokens) - 2) + [3, 3],
            "tokenizer.ggml.bos_token_id": len(tokens) - 2,
            "tokenizer.ggml.eos_token_id": len(tokens) - 1}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(TINY_MERGES)
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return meta


@pytest.fixture(scope="module", params=["llama-bpe", "gpt-2"])
def gguf_vocabulary(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "tiny.gguf"
    meta = tiny_gguf_vocabulary(path, request.param)
    return request.param, llama.Tokenizer.from_gguf(meta), path


@given(st.text(alphabet=st.sampled_from(list("0123456789 \n\t'sSthel.x\u00e9")), max_size=40))
def test_gguf_pre_tokenizer_equals_transformers(gguf_vocabulary, text):
    pre, ours, path = gguf_vocabulary
    ids = ours.encode(text)
    assert [ids] == ORACLE.tokenize(path, [text])
    assert ours.decode(ids) == text
    pieces = [ours.tok.id_to_token(i) for i in ours.encode("2024")]
    assert pieces == (["202", "4"] if pre == "llama-bpe" else ["2024"])


def test_unknown_gguf_pre_tokenizer_is_refused(tmp_path):
    meta = tiny_gguf_vocabulary(tmp_path / "v.gguf", "qwen2")
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported"):
        llama.Tokenizer.from_gguf(meta)


@pytest.mark.parametrize("text", [
    "Hello  world\n\n\tx = 1234567.89e-3", "naïve café, 日本語, Ελληνικά, emoji 🙂🚀",
    "def f(x):\n    return x ** 2  # squared\n", "   leading and trailing   ",
    "<|im_start|>user\nhi<|im_end|>", "don't won't I'm they're 'quoted' \"double\"",
])
def test_tokenizer_varied_strings(embedded, text):
    ours = embedded[1]
    ids = ours.encode(text)
    assert [ids] == ORACLE.tokenize(llama.embedded_gguf(), [text])
    assert ours.decode(ids) == text


def test_kv_cache_decoding_equals_full_forward(tiny_ckpt):
    ours, _ = llama.load(str(tiny_ckpt))
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    full = ours(ids)
    ours.setup_cache(1, 40)
    # a 25-token prefill, a 5-token chunk (mask with an offset), then one token at a time
    parts = [ours(ids[:, :25], 0), ours(ids[:, 25:30], 25)]
    parts += [ours(ids[:, t:t + 1], t) for t in range(30, 40)]
    ours.setup_cache(1, None)
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-4


def test_static_decoding_step_equals_full_forward(tiny_ckpt):
    # the CUDA-graph step's computation (0-d position tensor, whole cache under a mask), eagerly
    ours, _ = llama.load(str(tiny_ckpt))
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(5))
    full = ours(ids)
    ours.setup_cache(1, 32)  # longer than used: the unwritten positions must stay masked
    step = ours.static_decoder()
    parts = [ours(ids[:, :10], 0)] + [step(int(ids[0, t]), t).clone() for t in range(10, 24)]
    ours.setup_cache(1, None)
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-4
    prompt = [5, 17, 33, 8]
    assert ours.generate(prompt, 12, stop_ids=[], static=True) == \
        ours.generate(prompt, 12, stop_ids=[])


def test_compiled_static_step_equals_the_eager_one(tiny_ckpt):
    # static_decoder(compile=True): the same step through torch.compile (inductor fuses the
    # elementwise kernels; on a CPU it generates C++), same logits to fp32 rounding
    ours, _ = llama.load(str(tiny_ckpt))
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(6))
    runs = []
    for compile in (False, True):
        ours.setup_cache(1, 20)
        step = ours.static_decoder(compile=compile)
        with torch.no_grad():
            runs.append([ours(ids[:, :8], 0)] + [step(int(ids[0, t]), t).clone()
                                                  for t in range(8, 16)])
    ours.setup_cache(1, None)
    eager, compiled = (torch.cat(r, 1) for r in runs)
    assert (compiled - eager).abs().max().item() < 1e-5


def test_fused_projections_give_the_same_model(tiny_ckpt):
    # fuse_projections stacks q/k/v and gate/up into one linear each: the same logits and the
    # same greedy tokens (static decoding too); split_projections gives the original back
    ours, _ = llama.load(str(tiny_ckpt))
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(8))
    before, sd = ours(ids), {k: v.clone() for k, v in ours.state_dict().items()}
    prompt = [5, 17, 33, 8]
    tokens = ours.generate(prompt, 10, stop_ids=[])
    ours.fuse_projections()
    attn, mlp = ours.layers[0].self_attn, ours.layers[0].mlp
    assert attn.q_proj is None and mlp.gate_proj is None
    assert attn.qkv_proj.out_features == 64 + 2 * 32 and mlp.gate_up_proj.out_features == 320
    torch.testing.assert_close(ours(ids), before, rtol=1e-5, atol=1e-5)
    assert ours.generate(prompt, 10, stop_ids=[]) == tokens
    assert ours.generate(prompt, 10, stop_ids=[], static=True) == tokens
    ours.split_projections()
    after = ours.state_dict()
    assert after.keys() == sd.keys() and all(torch.equal(after[k], sd[k]) for k in sd)


def test_greedy_generation_deterministic_and_matches_argmax(tiny_ckpt):
    ours, _ = llama.load(str(tiny_ckpt))
    prompt = [5, 17, 33, 8]
    a = ours.generate(prompt, 12, stop_ids=[])
    assert a == ours.generate(prompt, 12, stop_ids=[]) and len(a) == 12
    seq = list(prompt)  # the same tokens from full forwards without a cache
    for _ in range(12):
        seq.append(int(ours(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[len(prompt):] == a
    s1 = ours.generate(prompt, 12, temperature=1.0, top_p=0.9, stop_ids=[], seed=7)
    assert s1 == ours.generate(prompt, 12, temperature=1.0, top_p=0.9, stop_ids=[], seed=7)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([5.0, 4.0, -10.0, -10.0])  # p ~ (0.73, 0.27, 0, 0)
    g = torch.Generator().manual_seed(0)
    draws = {llama.sample(logits, 1.0, 0.5, g) for _ in range(50)}
    assert draws == {0}
    draws = {llama.sample(logits, 1.0, 0.99, g) for _ in range(200)}
    assert draws == {0, 1}


def test_shards_with_a_straddling_layer_load_equal(tiny_ckpt, tmp_path):
    ours, _ = llama.load(str(tiny_ckpt))
    names = [("model." + k if not k.startswith("lm_head") else k) for k in ours.state_dict()]
    llama.save_hf(ours, tiny_ckpt, tmp_path / "sharded", shards=2, order=names)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files_of_layer0 = {f for k, f in index["weight_map"].items() if ".layers.0." in k}
    files_of_layer1 = {f for k, f in index["weight_map"].items() if ".layers.1." in k}
    assert len(files_of_layer0 | files_of_layer1) == 2
    assert len(files_of_layer0) == 2 or len(files_of_layer1) == 2  # one layer straddles
    back, _ = llama.load(str(tmp_path / "sharded"))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_loaded_weights_do_not_keep_the_file_mapped(tiny_ckpt):
    # safetensors hands out views of a memory map; if the model kept them, the file's pages
    # would stay resident next to every weight quantization replaces (1.8x the checkpoint's
    # size in host memory at 8B). The model must own its weights.
    from pathlib import Path
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc (Linux)")
    files = {str(p.resolve()) for p in Path(tiny_ckpt).glob("*.safetensors")}
    model, _ = llama.load(str(tiny_ckpt))  # fp32 file into an fp32 model: nothing converts
    assert model.layers[0].mlp.up_proj.weight.dtype == torch.float32 and files
    assert not [ln for ln in maps.read_text().splitlines() if any(f in ln for f in files)]


def test_bf16_load_casts_weights(tiny_ckpt):
    ours, _ = llama.load(str(tiny_ckpt), dtype="bf16")
    assert ours.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (1, 16))
    assert torch.isfinite(ours(ids).float()).all()


# -- bad input: each gives its own error, in user terms ----------------------------------------


def test_missing_shard(tiny_ckpt, tmp_path):
    ours, _ = llama.load(str(tiny_ckpt))
    llama.save_hf(ours, None, tmp_path / "s", shards=2)
    (tmp_path / "s" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(llama.CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        llama.load(str(tmp_path / "s"))


def test_truncated_file(tiny_ckpt):
    f = tiny_ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(llama.CheckpointError, match="truncated"):
        llama.load(str(tiny_ckpt))


def test_wrong_shape_names_tensor_and_shapes(tiny_ckpt):
    cfg_path = tiny_ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 128  # the tensors hold 160
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(llama.CheckpointError, match=r"gate_proj.weight.*\(160, 64\).*\(128, 64\)"):
        llama.load(str(tiny_ckpt))


def test_weights_that_cannot_fit_are_refused_before_loading(tiny_ckpt, monkeypatch):
    model, _ = llama.load(str(tiny_ckpt))
    n = sum(p.numel() for p in model.parameters())  # the weights the file holds
    monkeypatch.setattr(llama, "free_memory", lambda device: 3 * n)  # bf16 fits, fp32 not
    with pytest.raises(llama.CheckpointError, match=r"GiB in float32, more than .* --dtype bf16"):
        llama.load(str(tiny_ckpt))
    assert llama.load(str(tiny_ckpt), dtype="bf16")[0].embed_tokens.weight.dtype == torch.bfloat16


def test_missing_tensor_is_named(tiny_ckpt):
    cfg_path = tiny_ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] = 3  # the file has only 2 layers
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(llama.CheckpointError, match="layers.2.input_layernorm.weight.*missing"):
        llama.load(str(tiny_ckpt))


def test_unknown_rope_type(tiny_ckpt):
    cfg_path = tiny_ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown rope type 'yarn'"):
        llama.load(str(tiny_ckpt))


def test_bad_device_and_sampling_options(tiny_ckpt):
    with pytest.raises(ValueError, match="--device gpu"):
        llama.load(str(tiny_ckpt), device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            llama.load(str(tiny_ckpt), device="cuda")
    model, _ = llama.load(str(tiny_ckpt))
    for bad in [dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_p=0.0),
                dict(top_p=1.5)]:
        with pytest.raises(ValueError, match="want max_new_tokens >= 0"):
            model.generate([1, 5, 7], **({"max_new_tokens": 4} | bad))


def test_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="not a multiple"):
        llama.ModelArgs(n_heads=9, n_kv_heads=2)


def test_unknown_short_name_and_missing_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(llama.CheckpointError, match="unknown checkpoint name 'llama9-1t'"):
        llama.load("llama9-1t")
    with pytest.raises(llama.CheckpointError, match=r"(?s)not found.*checkpoints/llama3-8b.*download"):
        llama.load("llama3-8b")
    with pytest.raises(llama.CheckpointError, match="does not exist"):
        llama.load(str(tmp_path / "nope.gguf"))


def test_short_name_found_in_hf_cache_layout(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snap = tmp_path / "hf" / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    tiny_ckpt.rename(snap)
    assert llama.resolve_ckpt("llama3.2-1b") == snap


def test_failed_save_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    ours, _ = llama.load(str(tiny_ckpt))
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        llama.save_hf(ours, None, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no out/, no temp dir


KILLED_SAVE = """
import sys
sys.path.insert(0, {root!r})
import model as llama
if {fallback}:  # as on a system that cannot exchange two directories
    llama.exchange = lambda a, b: False
new, _ = llama.load({new!r})
llama.save_hf(new, None, {final!r})
"""


@pytest.mark.parametrize("kill_at,fallback", [("written", False), ("exchanged", False),
                                              ("written", True), ("renamed aside", True)])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, kill_at,
                                                                        fallback):
    import os
    import signal
    import subprocess
    import sys
    old_dir = tiny_checkpoint(tmp_path / "old", seed=1)
    new_dir = tiny_checkpoint(tmp_path / "new", seed=2)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = {name: llama.load(str(d))[0](ids) for name, d in (("old", old_dir), ("new", new_dir))}
    final = tmp_path / "out"
    llama.save_hf(llama.load(str(old_dir))[0], None, final)

    def holds():  # which whole checkpoint is at final
        out = llama.load(str(final))[0](ids)
        return next(name for name, ref in logits.items() if torch.equal(out, ref))

    code = KILLED_SAVE.format(root=str(llama.Path(llama.__file__).parent), fallback=fallback,
                              new=str(new_dir), final=str(final))
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MIXQ_KILL_AT": kill_at})
    assert r.returncode == -signal.SIGKILL
    if kill_at == "renamed aside":  # the one moment the fallback has no output at final
        assert not final.exists()
        llama.clean_leftovers(final)  # what the next save does first: the old one comes back
    assert holds() == ("new" if kill_at == "exchanged" else "old")
    llama.save_hf(llama.load(str(new_dir))[0], None, final)  # the next save cleans up and completes
    assert holds() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old", "out"]


def test_truncated_gguf_is_a_clear_error(tmp_path):
    src = llama.embedded_gguf()
    bad = tmp_path / "bad.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(llama.CheckpointError, match="not a readable GGUF"):
        llama.load(str(bad))


def test_streamed_text_equals_the_decoded_text(embedded, capsys):
    # byte-level BPE: a token may end inside a UTF-8 character, which must wait for the next one
    _, tok = embedded
    ids = tok.encode("Zürich, 東京 and 🙂: naïve café ☕ — ok")
    stop = tok.stop_ids()[0]
    stream = llama.TextStream(tok, [stop])
    printed = []
    for i in ids + [stop]:
        stream.add(i)
        printed.append(capsys.readouterr().out)
    stream.finish()
    printed.append(capsys.readouterr().out)
    assert "".join(printed) == tok.decode(ids) + "\n"
    assert not any("\ufffd" in p for p in printed)
    assert "" in printed[:len(ids)]  # some token did end inside a character, and waited


CHATS = [  # (system message or None, user text)
    (None, "What is the capital of France?"),
    ("You are terse.", "  Zürich or 東京? Answer in one word.  "),
]
LLAMA31_TEMPLATE = (Path(__file__).parent / "data" / "llama3.1_chat_template.jinja").read_text()


@pytest.mark.parametrize("template", ["smollm2", "llama3.1"])
def test_chat_prompts_render_the_templates_as_transformers_does(template, tmp_path):
    # the checkpoint's own template, rendered with jinja2 by model.py, against transformers'
    # apply_chat_template on the same tokenizer directory
    src = llama.embedded_checkpoint()
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(src / "tokenizer.json", d)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    if template == "llama3.1":  # Llama-3.1-Instruct's template and special-token strings
        tc |= {"chat_template": LLAMA31_TEMPLATE, "bos_token": "<|begin_of_text|>",
               "eos_token": "<|eot_id|>"}
    (d / "tokenizer_config.json").write_text(json.dumps(tc | {
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    tok = llama.load_tokenizer(d, llama.ModelArgs())
    for system, user in CHATS:
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": user}]
        ours = tok.chat_prompt(user, system)
        assert ours == ORACLE.chat(d, messages)
        assert user.strip() in ours and ours.count(user.strip()) == 1
    if template == "llama3.1":  # the system block the template always emits, and its BOS
        assert ours.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                               "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024")
        assert tok.chat_prompt("hi").count("<|start_header_id|>system") == 1


def test_a_tokenizer_without_a_chat_template_gives_no_chat_prompt(tmp_path):
    shutil.copy(llama.embedded_checkpoint() / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<|im_start|>"}')
    tok = llama.load_tokenizer(tmp_path, llama.ModelArgs())
    assert tok.special_tokens["bos_token"] == "<|im_start|>"
    assert tok.chat_prompt("hi") is None  # model.py --prompt then continues the text as is
