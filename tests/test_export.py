"""Checkpoints other tools run: the dense bit-stream packing, the GPTQ export checked against a
dequantizer written from the format's definition, GPTQ directories loaded through mixq's
kernels, compressed-tensors exports loaded by transformers (the oracle), compressed-tensors
directories (mixq's and compressed-tensors' own) read by mixq, and native mixq checkpoints
refused by transformers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file, save_file

import kernels
import mixq
import model as llama
from conftest import ORACLE, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# -- the packing, from its definition: one little-endian bit stream per column -------------

def stream_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes (K, N) -> uint32 words (K*bits/32, N): code k's bit i is bit k*bits + i of its
    column's stream, and word r holds stream bits 32r .. 32r+31 (lowest first)."""
    K, N = codes.shape
    stream = ((codes[:, None, :] >> np.arange(bits)[None, :, None]) & 1).reshape(K * bits, N)
    return (stream.reshape(-1, 32, N).astype(np.uint64)
            << np.arange(32, dtype=np.uint64)[None, :, None]).sum(1).astype(np.uint32)


def stream_unpack(words: np.ndarray, bits: int, K: int) -> np.ndarray:
    """uint32 words (K*bits/32, N) -> codes (K, N), bit by bit (np.unpackbits, little-endian)."""
    le = words.astype("<u4")
    stream = np.unpackbits(le.T.copy().view(np.uint8), axis=1, bitorder="little")  # (N, K*bits)
    per_code = stream.reshape(le.shape[1], K, bits).astype(np.int64)
    return (per_code << np.arange(bits)).sum(-1).T


@given(bits=st.integers(1, 8), words=st.integers(1, 3), n=st.integers(1, 5),
       seed=st.integers(0, 2 ** 16))
def test_dense_packing_is_one_bit_stream_per_column(bits, words, n, seed):
    K = 32 * words
    codes = torch.randint(0, 2 ** bits, (K, n), generator=torch.Generator().manual_seed(seed))
    packed = kernels.pack_dense(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (K * bits // 32, n)
    assert np.array_equal(packed.numpy().view(np.uint32), stream_pack(codes.numpy(), bits))
    assert torch.equal(kernels.unpack_dense(packed, bits, K).long(), codes)
    if 32 % bits == 0:  # 1, 2, 4, 8 bits: mixq's own words
        assert torch.equal(packed, kernels.pack(codes, bits))


# -- GPTQ ----------------------------------------------------------------------------------

def gptq_dequantize(t: dict, bits: int, v1: bool) -> torch.Tensor:
    """W (N, K) from a GPTQ linear, by the format's definition (independent of kernels.py):
    W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]), z = stored + 1 in v1."""
    K = t["g_idx"].numel()
    q = stream_unpack(t["qweight"].numpy().view(np.uint32), bits, K)  # (K, N)
    N = q.shape[1]
    z = stream_unpack(t["qzeros"].numpy().view(np.uint32).T.copy(), bits, N).T  # (G, N)
    z = (z + 1) % (1 << bits) if v1 else z
    gi = t["g_idx"].numpy()
    s = t["scales"].float().numpy()
    return torch.from_numpy((s[gi] * (q - z[gi]).astype(np.float32)).T.copy())


def tiny_quantized(tmp_path, cfg: mixq.QuantConfig, seed=0, zero_at=None):
    """A tiny random Llama, RTN-quantized with cfg and saved as a mixq checkpoint -> its path.
    zero_at: a linear whose first row is made nonnegative first (a grid with zero point 0)."""
    src = tmp_path / "fp"
    tiny_checkpoint(src, seed)
    model, _ = llama.load(str(src))
    if zero_at:
        w = model.get_submodule(zero_at).weight
        w.data[0] = w.data[0].abs()
    res = mixq.quantize_model(model, None, "rtn", cfg, log=lambda s: None)
    qc = {"quant_method": "mixq", "bits": cfg.wbits, "group_size": cfg.groupsize}
    mixq.save_quantized(model, res, src, tmp_path / "q", qc)
    return tmp_path / "q"


GRIDS = [  # bits, group size, symmetric (groups of 48 on 64 and 160 inputs: a partial last one)
    (4, 32, False), (4, -1, True), (3, 32, False), (3, -1, True), (2, 32, True), (8, -1, False),
    (8, 32, True), (2, -1, False), (4, 48, False), (3, 48, True)]


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits,g,sym", GRIDS)
def test_gptq_export_dequantizes_bit_exactly_to_mixqs_weights(bits, g, sym, fmt, tmp_path):
    q = tiny_quantized(tmp_path, mixq.QuantConfig(wbits=bits, groupsize=g, sym=sym))
    mixq.export_quantized(q, fmt, tmp_path / "gptq", log=lambda s: None)
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert fmt == "gptq" or qc["checkpoint_format"] == "gptq_v2"
    assert qc == json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (bits, g, sym, False)
    assert cfg["model_type"] == "llama"
    ours, theirs = load_file(str(q / "model.safetensors")), \
        load_file(str(tmp_path / "gptq" / "model.safetensors"))
    native = json.loads((q / "config.json").read_text())["quantization_config"]
    for m in native["modules"]:
        t = {k[len(m) + 1:]: v for k, v in ours.items() if k.startswith(m + ".")}
        N, K = t["scales"].shape[1], mixq.kernels_K(t["qweight"], bits)
        want = kernels.dequantize(t, bits, g, N, K)
        got = gptq_dequantize({k: theirs[f"{m}.{k}"] for k in
                               ("qweight", "qzeros", "scales", "g_idx")}, bits,
                              qc["checkpoint_format"] == "gptq")
        assert torch.equal(got, want), m
    for name in ours:  # everything else as it was
        if not name.rsplit(".", 1)[0] in native["modules"]:
            assert torch.equal(ours[name], theirs[name])
    if g == -1 or g == 32:  # groups compressed-tensors can store: mixq's export, replaced
        mixq.export_quantized(q, "compressed-tensors", tmp_path / "gptq", log=lambda s: None)
        assert not (tmp_path / "gptq" / "quantize_config.json").exists()


def test_a_zero_point_of_0_is_written_as_gptq_v2(tmp_path):
    # v1 stores z - 1, which a loader without AutoGPTQ's modulo reads back as 2^b, not 0
    q = tiny_quantized(tmp_path, mixq.QuantConfig(wbits=4, groupsize=32),
                       zero_at="layers.0.self_attn.q_proj")
    zeros = load_file(str(q / "model.safetensors"))["model.layers.0.self_attn.q_proj.zeros"]
    assert (zeros == 0).any()
    lines = []
    mixq.export_quantized(q, "gptq", tmp_path / "gptq", log=lines.append)
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and any("gptq_v2" in s for s in lines)
    back, _ = llama.load(str(tmp_path / "gptq"))
    native, _ = llama.load(str(q))
    x = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(back(x), native(x))


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits,g,sym", GRIDS[:4] + GRIDS[-2:])
def test_an_exported_gptq_directory_loads_through_mixqs_kernels(bits, g, sym, fmt, tmp_path):
    q = tiny_quantized(tmp_path, mixq.QuantConfig(wbits=bits, groupsize=g, sym=sym))
    mixq.export_quantized(q, fmt, tmp_path / "gptq", log=lambda s: None)
    back, _ = llama.load(str(tmp_path / "gptq"))
    native, _ = llama.load(str(q))
    assert isinstance(back.layers[1].mlp.down_proj, kernels.QuantLinear)
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(back(x), native(x))


def autogptq_style_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's packing loop (codes along dim 0 into int32 rows), written out for 2/3/4/8
    bits as its pack() does it: 3-bit codes 10 per word with the 11th split across two."""
    K, N = q.shape
    q = q.astype(np.uint64)
    out = np.zeros((K * bits // 32, N), dtype=np.uint64)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= q[j] << np.uint64(bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                out[row] |= q[j] << np.uint64(3 * (j - i))
            i += 10
            out[row] |= (q[i] << np.uint64(30)) & np.uint64(0xFFFFFFFF)
            row += 1
            out[row] |= (q[i] >> np.uint64(2)) & np.uint64(1)
            i += 1
            for j in range(i, i + 10):
                out[row] |= q[j] << np.uint64(3 * (j - i) + 1)
            i += 10
            out[row] |= (q[i] << np.uint64(31)) & np.uint64(0xFFFFFFFF)
            row += 1
            out[row] |= (q[i] >> np.uint64(1)) & np.uint64(3)
            i += 1
            for j in range(i, i + 10):
                out[row] |= q[j] << np.uint64(3 * (j - i) + 2)
            i += 10
            row += 1
    return out.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits,g", [(3, 32), (4, 32), (4, 48)])
def test_a_gptq_directory_from_an_independent_writer_gives_its_dequantized_logits(bits, g,
                                                                                   tmp_path):
    # random codes, scales and v1 zero points written as AutoGPTQ writes them; mixq's kernels
    # must give the logits of the plain model holding the dequantized weights. Groups of 48 on
    # 64 and 160 inputs end in a partial group, as GPTQModel writes g128 on 576 inputs
    src = tiny_checkpoint(tmp_path / "fp", 1)
    fp, _ = llama.load(str(src))
    gen = torch.Generator().manual_seed(bits)
    tensors = {n: t for n, t in load_file(str(src / "model.safetensors")).items()
               if not n.endswith("_proj.weight")}
    for name, lin in fp.named_modules():
        if not name.endswith("_proj"):
            continue
        N, K = lin.weight.shape
        q = torch.randint(0, 2 ** bits, (K, N), generator=gen)
        G = -(-K // g)
        z = torch.randint(1, 2 ** bits, (G, N), generator=gen)  # v1 stores z - 1
        s = (torch.rand(G, N, generator=gen) * 0.02 + 0.005).half()
        h = f"model.{name}"
        tensors |= {f"{h}.qweight": torch.from_numpy(autogptq_style_pack(q.numpy(), bits)),
                    f"{h}.qzeros": torch.from_numpy(
                        autogptq_style_pack((z - 1).T.numpy(), bits).T.copy()),
                    f"{h}.scales": s, f"{h}.g_idx": torch.arange(K, dtype=torch.int32) // g,
                    f"{h}.bias": torch.zeros(N, dtype=torch.float16)}  # AutoGPTQ writes one
        group = torch.arange(K) // g
        lin.weight.data = (s.float()[group] * (q - z[group])).T
    d = tmp_path / "gptq"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg))  # the config in quantize_config.json only
    (d / "quantize_config.json").write_text(json.dumps(
        {"bits": bits, "group_size": g, "desc_act": False, "sym": False}))
    back, _ = llama.load(str(d))
    assert isinstance(back.layers[0].self_attn.q_proj, kernels.QuantLinear)
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back(x), fp(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="a checkpoint mixq did not write"):  # never replaced
        mixq.export_quantized(tiny_quantized(tmp_path / "m", mixq.QuantConfig(wbits=4)), "gptq", d)
    if g == 48:  # a config whose group size does not match the tensors: the groups named
        (d / "quantize_config.json").write_text(json.dumps(
            {"bits": bits, "group_size": 64, "desc_act": False, "sym": False}))
        with pytest.raises(llama.CheckpointError, match=r"scales \(4, 64\); 4-bit codes of a "
                           r"64x160 weight in groups of 64 \(3 groups\) want .* scales \(3, 64\)"):
            llama.load(str(d))


def test_act_order_g_idx_is_refused_clearly(tmp_path):
    q = tiny_quantized(tmp_path, mixq.QuantConfig(wbits=4, groupsize=32))
    mixq.export_quantized(q, "gptq", tmp_path / "gptq", log=lambda s: None)
    f = tmp_path / "gptq" / "model.safetensors"
    t = load_file(str(f))
    name = "model.layers.0.mlp.up_proj.g_idx"
    t[name] = t[name].flip(0).contiguous()  # desc_act: groups follow a column permutation
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(llama.CheckpointError, match="up_proj: g_idx is not k // group_size"):
        llama.load(str(tmp_path / "gptq"))


def test_weights_kept_in_16_bits_are_refused_or_dropped_with_a_count(tmp_path):
    src = tiny_checkpoint(tmp_path / "fp")
    model, _ = llama.load(str(src))
    calib = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    res = mixq.quantize_model(model, calib, "spqr", mixq.QuantConfig(wbits=3),
                              log=lambda s: None)
    kept = sum(r["kept"] for r in res.values())
    assert kept > 0
    mixq.save_quantized(model, res, src, tmp_path / "q",
                        {"quant_method": "mixq", "bits": 3, "group_size": res[
                            "layers.0.self_attn.q_proj"]["groupsize"]})
    with pytest.raises(ValueError, match=f"keeps {kept:,} weights in 16 bits"):
        mixq.export_quantized(tmp_path / "q", "gptq", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    lines = []
    mixq.export_quantized(tmp_path / "q", "gptq", tmp_path / "out", drop_kept=True,
                          log=lines.append)
    assert any(f"dropping {kept:,} weights" in s for s in lines)


def test_export_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--export awq: choose one of"):
        mixq.run(method="rtn", export=("awq", str(tmp_path / "x")), evals=[])
    with pytest.raises(ValueError, match="tacq keeps weights in 16 bits"):
        mixq.run(method="tacq", export=("gptq", str(tmp_path / "x")), evals=[])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        mixq.run(method="rtn", export=("gptq", str(tmp_path / "mine")), evals=[])
    # the embedded model's 576 inputs hold 4.5 groups of 128: GPTQ stores the partial last one,
    # compressed-tensors cannot (its loader refuses it); refused before quantizing
    with pytest.raises(ValueError, match="128 does not divide 576 .a partial last group"):
        mixq.run(method="rtn", cfg=mixq.QuantConfig(groupsize=128), evals=[],
                 export=("compressed-tensors", str(tmp_path / "ct")))
    q = tiny_quantized(tmp_path, mixq.QuantConfig(wbits=4, groupsize=48))
    with pytest.raises(ValueError, match="48 does not divide 64, 160"):
        mixq.export_quantized(q, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


# -- compressed-tensors, loaded by transformers ------------------------------------------------

def ct_available():
    import importlib.util
    return importlib.util.find_spec("compressed_tensors") is not None


needs_ct = pytest.mark.skipif(not ct_available(), reason="compressed-tensors (test-only) is "
                              "not installed")


@needs_ct
@pytest.mark.parametrize("bits,g,sym", GRIDS[:-2])
def test_compressed_tensors_export_gives_mixqs_logits_in_transformers(bits, g, sym, tmp_path):
    q = tiny_quantized(tmp_path, mixq.QuantConfig(wbits=bits, groupsize=g, sym=sym))
    mixq.export_quantized(q, "compressed-tensors", tmp_path / "ct", log=lambda s: None)
    weights = json.loads((tmp_path / "ct" / "config.json").read_text())[
        "quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (bits, sym)
    native, _ = llama.load(str(q))
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    # transformers' compressed modules register an asymmetric zero point unpacked, so they
    # cannot receive the packed one that compressed-tensors itself writes (llm-compressor
    # issue 1618); its dequantize=True path (compressed-tensors' own decompressor) reads them
    theirs = ORACLE.forward(tmp_path / "ct", x, dequantize=not sym)["logits"]
    torch.testing.assert_close(theirs, native(x), rtol=1e-5, atol=1e-5)


@needs_ct
@pytest.mark.parametrize("bits,g,sym", [(4, 64, False), (8, -1, True), (3, 64, True)])
def test_the_embedded_model_exported_to_compressed_tensors_runs_in_transformers(bits, g, sym,
                                                                                 tmp_path):
    out = tmp_path / "ct"
    mixq.run(method="rtn", cfg=mixq.QuantConfig(wbits=bits, groupsize=g, sym=sym), evals=[],
             save=str(tmp_path / "q"), export=("compressed-tensors", str(out)))
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    native, tok = llama.load(str(tmp_path / "q"))
    x = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    theirs = ORACLE.forward(out, x, dequantize=not sym)["logits"]
    ours = native(x)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    if bits == 4:  # --ckpt reads it in eval.py and mixq.py (which starts from its weights)
        r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--ckpt", str(out),
                            "--windows", "2", "--json", str(tmp_path / "e.json")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        ppl = json.loads((tmp_path / "e.json").read_text())["ppl"]
        assert ppl == pytest.approx(mixq.metrics.perplexity(
            native, mixq.metrics.corpus_tokens("pydoc", tok, "eval"), 512, 2)["ppl"], rel=1e-6)
        res = mixq.run(ckpt=str(out), method="rtn", cfg=mixq.QuantConfig(wbits=8),
                       evals=["pydoc"], eval_windows=2)
        assert res["fp"]["pydoc"]["ppl"] == pytest.approx(ppl, rel=1e-6)
        assert ppl < res["quant"]["pydoc"]["ppl"] < 1.01 * ppl  # 8 bits on its 4-bit weights


# -- reading compressed-tensors ----------------------------------------------------------------

@pytest.mark.parametrize("bits,g,sym", GRIDS[:-2])
def test_mixqs_compressed_tensors_export_reads_back_to_the_same_logits(bits, g, sym, tmp_path):
    q = tiny_quantized(tmp_path, mixq.QuantConfig(wbits=bits, groupsize=g, sym=sym))
    mixq.export_quantized(q, "compressed-tensors", tmp_path / "ct", log=lambda s: None)
    back, _ = llama.load(str(tmp_path / "ct"))
    native, _ = llama.load(str(q))
    assert isinstance(back.layers[1].mlp.down_proj, kernels.QuantLinear)
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(back(x), native(x))
    if not sym:  # older compressed-tensors releases stored the zero points unpacked, int8 (N, G)
        path = tmp_path / "ct" / "model.safetensors"
        t = load_file(str(path))
        for name in [n for n in t if n.endswith(".weight_zero_point")]:
            N = int(t[name.replace("zero_point", "shape")][0])
            zp = kernels.unpack_dense(torch.nn.functional.pad(t[name], (0, 0, 0, (-N % 32) * bits
                                                                        // 32)), bits, N)
            t[name] = (zp[:N].to(torch.int16) - (1 << (bits - 1))).to(torch.int8).contiguous()
        save_file(t, str(path), metadata={"format": "pt"})
        assert torch.equal(llama.load(str(tmp_path / "ct"))[0](x), native(x))


@needs_ct
@pytest.mark.parametrize("bits,g,sym", [(4, 32, True), (4, 32, False), (8, -1, True),
                                        (8, -1, False), (4, -1, False)])
def test_a_checkpoint_from_compressed_tensors_own_compressor_gives_its_logits(bits, g, sym,
                                                                               tmp_path):
    # llm-compressor's W4A16 / W8A16 schemes and their _ASYM forms (group and channel
    # strategies), compressed by compressed-tensors itself; transformers decompresses the same
    # directory with compressed-tensors' own code
    ct = ORACLE.compress(tiny_checkpoint(tmp_path / "fp", 2), tmp_path / "ct", bits, g, sym)
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    ours, _ = llama.load(str(ct))
    assert isinstance(ours.layers[0].self_attn.q_proj, kernels.QuantLinear)
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    theirs = ORACLE.forward(ct, x, dequantize=True)["logits"]
    torch.testing.assert_close(ours(x), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,msg", [
    (lambda qc: qc | {"format": "float-quantized"}, "format 'float-quantized'"),
    (lambda qc: qc | {"quantization_status": "frozen"}, "quantization_status 'frozen'"),
    (lambda qc: qc | {"kv_cache_scheme": {"num_bits": 8}}, "a quantized KV cache"),
    (lambda qc: qc | {"transform_config": {"config_groups": {"u": {}}}}, "transforms"),
    (lambda qc: json.loads(json.dumps(qc).replace('"input_activations": null',
                                                  '"input_activations": {"num_bits": 8}')),
     "quantized activations"),
    (lambda qc: json.loads(json.dumps(qc).replace('"strategy": "group"', '"strategy": "block"')),
     "weights strategy 'block'"),
    (lambda qc: json.loads(json.dumps(qc).replace('"group_size": 32', '"group_size": null')),
     "weights group_size None"),
    (lambda qc: qc | {"config_groups": {}}, "no config_groups")])
def test_compressed_tensors_that_mixq_cannot_run_is_refused_naming_it(change, msg, tmp_path):
    q = tiny_quantized(tmp_path, mixq.QuantConfig(wbits=4, groupsize=32))
    mixq.export_quantized(q, "compressed-tensors", tmp_path / "ct", log=lambda s: None)
    path = tmp_path / "ct" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"] = change(cfg["quantization_config"])
    path.write_text(json.dumps(cfg))
    with pytest.raises(llama.CheckpointError, match=f"compressed-tensors with {msg}.*mixq reads "
                       "pack-quantized int weights"):
        llama.load(str(tmp_path / "ct"))


# -- native checkpoints ------------------------------------------------------------------------

def test_transformers_refuses_a_native_mixq_checkpoint(tmp_path):
    q = tiny_quantized(tmp_path, mixq.QuantConfig(wbits=4, groupsize=32))
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["model_type"] == "mixq_llama"
    assert cfg["quantization_config"]["modules"][0].startswith("model.layers.")  # file names
    with pytest.raises(RuntimeError, match="mixq_llama"):
        ORACLE.forward(q, torch.zeros(1, 4, dtype=torch.long))
    assert isinstance(llama.load(str(q))[0].layers[0].mlp.up_proj, kernels.QuantLinear)


def test_a_native_checkpoint_keeps_the_sources_dtype_and_side_files(tmp_path):
    src = tiny_checkpoint(tmp_path / "fp")
    model, _ = llama.load(str(src), "bf16")
    llama.save_hf(model, None, tmp_path / "bf16")
    (tmp_path / "bf16" / "generation_config.json").write_text('{"temperature": 0.6}')
    model, _ = llama.load(str(tmp_path / "bf16"))  # fp32 in memory
    res = mixq.quantize_model(model, None, "rtn", mixq.QuantConfig(wbits=4, groupsize=32),
                              log=lambda s: None)
    mixq.save_quantized(model, res, tmp_path / "bf16", tmp_path / "q",
                        {"quant_method": "mixq", "bits": 4, "group_size": 32})
    t = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.norm.weight"].dtype == torch.bfloat16
    assert (tmp_path / "q" / "generation_config.json").read_text() == '{"temperature": 0.6}'
    assert json.loads((tmp_path / "q" / "config.json").read_text())["torch_dtype"] == "bfloat16"
