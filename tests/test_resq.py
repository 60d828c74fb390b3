"""ResQ's exact transformations: every change of basis leaves the fp logits alone; then the
quantizers, the high slice and the pipeline."""

import json
import shutil

import pytest
import torch
from hypothesis import given, strategies as st

import kernels
import mixq
import model as llama
from conftest import tiny_checkpoint


def tiny(tmp_path, **over):
    tiny_checkpoint(tmp_path / "m", **over)
    return llama.load(str(tmp_path / "m"))[0]


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("tied", [False, True])
def test_fold_norms_is_exact(tmp_path, tied):
    model = tiny(tmp_path, tie_word_embeddings=tied)
    x = torch.randint(0, 128, (1, 40))
    before = model(x)
    mixq.fold_norms(model)
    assert all((b.input_layernorm.weight == 1).all() for b in model.layers)
    assert rel_diff(model(x), before) < 1e-5


@pytest.mark.parametrize("rotation", ["pca", "random", "none"])
def test_fused_bases_leave_logits_unchanged(tmp_path, rotation):
    # hidden_dim 160 = 5 * 32: the online Hadamard uses its odd factor
    model = tiny(tmp_path, tie_word_embeddings=True)
    x = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    before = model(x)
    down = model.layers[0].mlp.down_proj.weight.clone()
    mixq.fold_norms(model)
    cov = mixq.resq_covariances(model, torch.randint(0, 128, (3, 32)))
    bases = mixq.resq_bases(cov, model.args, rotation=rotation)
    mixq.fuse_resq(model, bases)
    assert rel_diff(model(x), before) < 1e-4
    # the weights really changed (or not, without rotations)
    assert torch.equal(model.layers[0].mlp.down_proj.weight, down) == (rotation == "none")


def test_fused_bases_on_the_embedded_model(embedded):
    import copy
    import eval as metrics
    model = copy.deepcopy(embedded[0])
    ids = metrics.corpus_tokens("pydoc", embedded[1], "all")[:64][None]
    before = model(ids)
    mixq.fold_norms(model)
    cov = mixq.resq_covariances(model, [metrics.corpus_tokens("pydoc", embedded[1], "calib")[:128]])
    mixq.fuse_resq(model, mixq.resq_bases(cov, model.args))
    assert rel_diff(model(ids), before) < 1e-4


def test_covariances_equal_the_moments_of_a_full_forward(tmp_path):
    # resq_covariances walks the model block by block; hooks on a plain forward see the same
    model = tiny(tmp_path)
    a, hd = model.args, model.args.head_dim
    calib = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(2))
    seen = {"resid": [], "v": [], "k": []}
    hooks = []
    for b in model.layers:
        hooks += [b.self_attn.q_proj.register_forward_hook(
                      lambda m, i, o: seen["resid"].append(i[0].reshape(-1, a.dim))),
                  b.mlp.gate_proj.register_forward_hook(
                      lambda m, i, o: seen["resid"].append(i[0].reshape(-1, a.dim))),
                  b.self_attn.v_proj.register_forward_hook(
                      lambda m, i, o: seen["v"].append(o.reshape(-1, a.n_kv_heads, hd)))]
        b.self_attn.post_rope = lambda q, k: (seen["k"].append(k[0]), (q, k))[1]
    for c in calib:
        model(c[None])
    for h in hooks:
        h.remove()
    for b in model.layers:
        b.self_attn.post_rope = None
    cov = mixq.resq_covariances(model, calib)
    X = torch.cat(seen["resid"]).double()
    torch.testing.assert_close(cov["resid"], X.T @ X / len(X))
    L, T = a.n_layers, calib.numel()
    V = [torch.cat(seen["v"][li::L]).double() for li in range(L)]  # (T, Hkv, hd) per layer
    K = [torch.cat(seen["k"][li::L], dim=1).double() for li in range(L)]  # (Hkv, T, hd)
    for li in range(L):
        torch.testing.assert_close(cov["value"][li], torch.einsum("thi,thj->hij", V[li], V[li]) / T)
        torch.testing.assert_close(cov["key"][li],
                                   torch.einsum("hti,htj->ij", K[li], K[li]) / (T * a.n_kv_heads))


def test_fusing_needs_folded_norms(tmp_path):
    model = tiny(tmp_path)  # norm gains random in [0.5, 1.5]
    cov = mixq.resq_covariances(model, torch.randint(0, 128, (2, 16)))
    with pytest.raises(ValueError, match="fold_norms"):
        mixq.fuse_resq(model, mixq.resq_bases(cov, model.args))


def test_high_slice_holds_the_most_energy_of_the_quantized_activations(tmp_path):
    # the basis comes from the activations that get quantized: the inputs of q/k/v and gate/up
    # after the norms are folded (their gains, random in [0.5, 1.5] here, move into the weights)
    model = tiny(tmp_path)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))
    mixq.resq_prepare(model, calib, mixq.method_config("resq", mixq.QuantConfig(wbits=4)),
                   log=lambda s: None)
    seen = []
    for b in model.layers:
        for lin in (b.self_attn.q_proj, b.mlp.gate_proj):
            lin.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, 64)))
    for c in calib:
        model(c[None])
    X = torch.cat(seen).double()  # (N, d) in the U_A basis; the high slice is the last d/8
    top = torch.linalg.eigvalsh(X.T @ X)[-8:].sum()  # the most any 8-dim subspace can hold
    assert X[:, -8:].pow(2).sum() / top > 1 - 1e-5


def test_bases_are_orthogonal(tmp_path):
    model = tiny(tmp_path)
    cov = mixq.resq_covariances(model, torch.randint(0, 128, (2, 32)))
    b = mixq.resq_bases(cov, model.args)
    eye = torch.eye(64, dtype=torch.float64)
    assert torch.allclose(b.U_A.T @ b.U_A, eye, atol=1e-10)
    hd = model.args.head_dim
    for U in list(b.U_V.reshape(-1, hd, hd)) + list(b.U_K):
        assert torch.allclose(U.T @ U, torch.eye(hd, dtype=torch.float64), atol=1e-10)


def test_key_rotation_keeps_attention_scores():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 10, 16, generator=g), torch.randn(1, 4, 10, 16, generator=g)
    U = mixq.random_orthogonal(16, g)
    q2, k2 = llama.KeyRotation(U)(q, k)
    assert torch.allclose(q2 @ k2.transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-5)
    # ResQ's code at 8 bits: q and k per (token, head), then a rotation by an 8-bit U_K
    q8, k8 = llama.KeyRotation(U, input_bits=8)(q, k)
    step = mixq.round_up_fp16(U.abs().max() / 127)  # U_K's grid: steps of max|U| / 127 (fp16)
    U8 = torch.round(U / step) * step
    assert torch.allclose(U8.float(), U.float(), atol=float(step) / 2 * 1.001)
    for x, x8 in ((q, q8), (k, k8)):
        torch.testing.assert_close(x8, mixq.quantize_activations(x, 8, 8) @ U8.float(),
                                   rtol=1e-3, atol=1e-3)
    assert not torch.equal(q8, q2)


@given(seed=st.integers(0, 10 ** 6), n=st.sampled_from([8, 12, 20]))
def test_pca_subspace_has_the_most_energy(seed, n):
    # Ky Fan: ||X P_h||^2 >= ||X V||^2 for any orthonormal V with r columns
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g,
                                                                            dtype=torch.float64)
    cov = X.T @ X / 200
    r = max(1, n // 4)
    P = mixq.pca_basis(cov, percdamp=0.0)[:, -r:]
    V = mixq.random_orthogonal(n, g)[:, :r]
    assert (X @ P).pow(2).sum() >= (X @ V).pow(2).sum() - 1e-9
    # the rotation inside the subspace keeps its energy
    U = mixq.subspace_rotation(mixq.pca_basis(cov, percdamp=0.0), r, g)[:, -r:]
    assert torch.isclose((X @ U).pow(2).sum(), (X @ P).pow(2).sum())


@pytest.mark.parametrize("n", [16, 96, 160])
def test_hadamard_transform_is_orthogonal(n):
    g = torch.Generator().manual_seed(n)
    odd = mixq.odd_factor(n, g)
    H = llama.hadamard_transform(torch.eye(n, dtype=torch.float64), odd)  # rows: e_i H
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    if odd is None:  # a power of two: the Sylvester Hadamard matrix / sqrt(n)
        assert torch.allclose(H.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


# -- part 2: the quantizers -----------------------------------------------------------------------


@given(seed=st.integers(0, 10 ** 6), bits=st.sampled_from([2, 4, 8]), r=st.sampled_from([0, 4]))
def test_activation_error_at_most_half_a_step_and_batch_independent(seed, bits, r):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 32, generator=g) * torch.rand(32, generator=g) * 10
    xq = mixq.quantize_activations(x, bits, 8, r)
    for sl, b in ((slice(0, 32 - r), bits), (slice(32 - r, 32), 8)):
        part = x[:, sl]
        if part.shape[1] == 0:
            continue
        s, _ = mixq.fit_grid(part, b)  # the slice's own per-token scale
        assert ((xq[:, sl] - part).abs() <= s / 2 + 1e-6).all()
    # each token alone gives the same numbers as the batch
    assert torch.equal(torch.cat([mixq.quantize_activations(x[i:i + 1], bits, 8, r)
                                  for i in range(6)]), xq)
    assert torch.equal(mixq.quantize_activations(x, 16, 16, r), x)  # 16 bits: exact


@given(seed=st.integers(0, 10 ** 6), bits=st.sampled_from([2, 4, 8]), zero=st.booleans())
def test_activation_codes_are_fit_grids_codes(seed, bits, zero):
    # kernels.py's per-token grid (it imports nothing of ours) is mixq's fit_grid without MSE
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 24, generator=g) * torch.rand(12, 1, generator=g) * 5 + \
        torch.randn(12, 1, generator=g) * 3
    x[0] = 1.5  # a flat row
    c, s, z = kernels.activation_codes(x, bits, zero)
    s2, z2 = mixq.fit_grid(x, bits, zero_in_range=zero)
    assert torch.equal(s, s2) and torch.equal(z, z2)
    assert torch.equal(c, mixq.quant_codes(x, s2, z2, 2 ** bits - 1))


@given(seed=st.integers(0, 10 ** 6))
def test_gptq_high_columns_get_their_own_grid(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(8, 32, generator=g, dtype=torch.float64)
    high = torch.arange(32) >= 28
    cfg = mixq.QuantConfig(wbits=4, sym=True, high_bits=8)
    qz = mixq.gptq(W, torch.eye(32, dtype=torch.float64), mixq.QuantConfig(**{**vars(cfg),
                                                                        "percdamp": 0.0}),
                high=high)
    assert qz.codes[:, ~high].max() <= 15 and qz.codes[:, high].max() <= 255
    # with H = I nothing propagates: each slice is RTN on its own grid
    for cols, b in ((~high, 4), (high, 8)):
        s, z = mixq.fit_grid(W[:, cols], b, sym=True)
        assert torch.equal(qz.dequantize()[:, cols], mixq.fake_quant(W[:, cols], s, z, 2 ** b - 1))
    assert mixq.stored_bits(qz) == 8 * (28 * 4 + 4 * 8) + 2 * 8 * 2 * 16


@given(seed=st.integers(0, 10 ** 6))
def test_gptq_takes_the_low_columns_first_then_the_high(seed):
    # o_proj's high columns (the last 2 of each head of 8) go last, as ResQ moves them to the
    # end before its GPTQ: the same as GPTQ on the permuted problem, whose high columns are the
    # last 8, permuted back
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(8, 32, generator=g, dtype=torch.float64)
    X = torch.randn(128, 32, generator=g, dtype=torch.float64) @ \
        torch.randn(32, 32, generator=g, dtype=torch.float64)
    H = X.T @ X / 128
    high = (torch.arange(32) % 8) >= 6
    perm = torch.cat([torch.nonzero(~high).flatten(), torch.nonzero(high).flatten()])
    cfg = mixq.QuantConfig(wbits=4, sym=True, signed=True, high_bits=8)
    a = mixq.gptq(W, H, cfg, high=high)
    b = mixq.gptq(W[:, perm], H[perm][:, perm], cfg, high=high[perm])
    assert torch.equal(a.codes[:, perm], b.codes)
    torch.testing.assert_close(a.dequantize()[:, perm], b.dequantize(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="low columns first"):
        mixq.gptq(W, H, mixq.QuantConfig(**{**vars(cfg), "act_order": True}), high=high)


def test_activation_grids_of_o_proj_and_values_are_plain_min_max(tmp_path):
    # ResQ's code: per-token grids contain 0 (q/k/v/gate/up/down inputs, keys); the per-head
    # grids of o_proj's inputs and of the values span min..max
    model = tiny(tmp_path)
    cfg = mixq.method_config("resq", mixq.QuantConfig(wbits=4, abits=4, kvbits=4))
    mixq.install_resq_quantizers(model, cfg)
    att, hd = model.layers[0].self_attn, model.args.head_dim
    r = mixq.n_high(hd, cfg)
    x = torch.rand(3, att.o_proj.weight.shape[1], generator=torch.Generator().manual_seed(0)) + 1
    heads = {zr: mixq.per_head(lambda t: mixq.quantize_activations(t, 4, 8, r, zr), hd)(x)
             for zr in (True, False)}  # all x > 0: a range from 0 is wider than min..max
    assert not torch.equal(heads[True], heads[False])
    o_in = att.o_proj.quantize(x)  # mixq.FakeQuantLinear's input quantizer
    keys, values = att.kv_quant.fake(x.reshape(3, -1, hd), x.reshape(3, -1, hd))
    assert torch.equal(o_in, heads[False]) and torch.equal(values.reshape(x.shape), heads[False])
    assert torch.equal(keys.reshape(x.shape), heads[True])
    d = model.args.dim
    q_in = att.q_proj.quantize(x[:, :d])
    assert torch.equal(q_in, mixq.quantize_activations(x[:, :d], 4, 8, mixq.n_high(d, cfg)))


@pytest.mark.parametrize("abits,kvbits", [(4, 4), (16, 4), (4, 16)])
def test_q_and_k_go_to_8_bits_with_a_quantized_kv_cache(tmp_path, abits, kvbits):
    # ResQ's code quantizes q, k and U_K to a fixed 8 bits when the keys are quantized
    model = tiny(tmp_path)
    cfg = mixq.method_config("resq", mixq.QuantConfig(wbits=4, abits=abits, kvbits=kvbits,
                                                      high_bits=6))
    mixq.install_resq_quantizers(model, cfg)
    rot = model.layers[0].self_attn.post_rope
    assert (16 if rot is None else rot.input_bits) == (8 if kvbits < 16 else 16)


@pytest.mark.parametrize("name", ["layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj",
                                  "layers.0.mlp.down_proj"])
@given(seed=st.integers(0, 10 ** 6), abits=st.sampled_from([4, 8]), wbits=st.sampled_from([2, 4]))
def test_integer_linear_is_the_fake_quantized_one(name, seed, abits, wbits):
    # kernels.ResQLinear (integer codes, int32 sums, scales once at the end) against the paper's
    # fake quantization: the activation quantizer of mixq, then x_hat @ W_hat^T in fp64
    args = llama.ModelArgs(dim=128, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=160)
    cfg = mixq.method_config("resq", mixq.QuantConfig(wbits=wbits, abits=abits, kvbits=4))
    g = torch.Generator().manual_seed(seed)
    slices, _ = mixq.resq_slices(name, args, cfg)
    K = sum(sl["width"] for sl in slices)
    W = torch.randn(48, K, generator=g)
    X = torch.randn(256, K, generator=g) @ torch.randn(K, K, generator=g)
    qz = mixq.gptq(W, X.T @ X / 256, cfg, high=mixq.resq_high_columns(name, args, cfg))
    lin = mixq.resq_linear(qz, name, args, cfg)
    assert torch.equal(lin.dequantized_weight(), qz.dequantize().float())
    x = torch.randn(2, 5, K, generator=g) * torch.rand(K, generator=g) * 4
    x[..., :K // 2] = x[..., :K // 2].abs() + 1  # groups all above 0: ranges with 0 are wider
    r_head = mixq.n_high(args.head_dim, cfg)
    if name.endswith("o_proj"):
        xq = mixq.per_head(lambda t: mixq.quantize_activations(t, abits, 8, r_head, False),
                           args.head_dim)(x)
    else:
        r = 0 if name.endswith("down_proj") else mixq.n_high(K, cfg)
        xq = mixq.quantize_activations(x, abits, 8, r)
    ref = xq.double() @ qz.dequantize().double().T
    y = lin(x)
    assert y.dtype == x.dtype and y.shape == (2, 5, 48)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    # the paper's path as mixq runs it: each group's product exact, rounded once, the groups
    # summed in fp32 in the same order: the same numbers
    fake = mixq.FakeQuantLinear(torch.nn.Linear(K, 48, bias=False), lambda t: xq,
                                mixq.resq_groups(name, args, cfg))
    fake.weight.data = qz.dequantize().float()
    assert torch.equal(fake(x), y)


def resq_weights(model, cfg):
    """ResQ's bases and GPTQ on a tiny model (4 x 32 random calibration tokens) -> results."""
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(4))
    mixq.resq_prepare(model, calib, cfg, log=lambda s: None)
    return mixq.quantize_model(model, calib, "resq", cfg, log=lambda s: None)


@pytest.mark.parametrize("rotation,abits", [("pca", 4), ("pca", 16), ("random", 4),
                                            ("none", 4)])
def test_resq_pipeline_on_a_tiny_model(tmp_path, rotation, abits):
    model = tiny(tmp_path)
    x = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    fp = model(x)
    cfg = mixq.method_config("resq", mixq.QuantConfig(wbits=4, abits=abits, kvbits=abits,
                                                rotation=rotation))
    res = resq_weights(model, cfg)
    w4 = model(x)
    mixq.install_resq_quantizers(model, cfg)
    out = model(x)
    assert torch.isfinite(out).all() and not torch.equal(out, fp)
    assert torch.equal(out, w4) == (abits == 16)  # A16: the quantizers change nothing
    q = res["layers.0.self_attn.q_proj"]
    if rotation == "pca":  # 1/8 of q's input columns on the 8-bit grid
        assert q["bits_stored"] == 64 * (56 * 4 + 8 * 8) + 2 * 64 * 2 * 16
        if abits < 16:  # the 8-bit slices raise the average above 4
            # tiny model: inputs of q/k/v/gate/up 5 x 64 (8 high each), o 4 heads x 16 (2
            # high each), down 160 (all low): (8 * 48 + 4 * 496) / 544
            assert mixq.activation_bits(model.args, cfg) == pytest.approx(2368 / 544)
    else:
        assert q["bits_stored"] == 64 * 64 * 4 + 2 * 64 * 1 * 16


def test_high_fraction_zero_is_the_quarot_style_path(tmp_path):
    model = tiny(tmp_path)
    pca0 = mixq.method_config("resq", mixq.QuantConfig(wbits=4, abits=4, kvbits=4, high_fraction=0.0))
    quarot = mixq.method_config("resq", mixq.QuantConfig(wbits=4, abits=4, kvbits=4,
                                                   rotation="random"))
    for cfg in (pca0, quarot):  # no 8-bit columns, no 8-bit activation slice
        assert all(mixq.resq_high_columns(n, model.args, cfg) is None
                   for n in ("layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj"))
        assert mixq.activation_bits(model.args, cfg) == 4
    cov = mixq.resq_covariances(model, torch.randint(0, 128, (2, 16)))
    U = mixq.resq_bases(cov, model.args, high_fraction=0.0, rotation="pca").U_A
    # one Haar rotation of the whole space after the PCA basis: no subspace structure is kept
    P = mixq.pca_basis(cov["resid"])
    R = P.T @ U
    assert torch.allclose(R.T @ R, torch.eye(64, dtype=torch.float64), atol=1e-10)
    assert R[:-8, -8:].abs().max() > 1e-3  # the top-8 directions mix with the rest


# -- a saved ResQ model: integer linears, the online parts, the quantized KV cache -----------------


@given(seed=st.integers(0, 10 ** 6), bits=st.sampled_from([2, 3, 4]), r=st.sampled_from([0, 4]),
       T=st.integers(1, 6))
def test_quantized_kv_cache_stores_codes_and_reads_back_the_fake_quantized_values(seed, bits, r,
                                                                                  T):
    g = torch.Generator().manual_seed(seed)
    quant = llama.KVQuantizer(bits, 8, r)
    cache = llama.QuantKVCache(2, 3, 16, 32, quant, torch.float32, "cpu")
    k, v = (torch.randn(2, 3, 10, 32, generator=g) * 3 + 1 for _ in range(2))
    cache.update(0, k[:, :, :4], v[:, :, :4])  # a prompt, then T positions more
    k2, v2 = cache.update(4, k[:, :, 4:4 + T], v[:, :, 4:4 + T])
    fk, fv = quant.fake(k[:, :, :4 + T], v[:, :, :4 + T])
    assert torch.equal(k2, fk) and torch.equal(v2, fv)
    assert all(b.dtype in (torch.uint8, torch.float16, torch.int32) for b in cache.buffers())
    # per batch row, head, keys and values: each slice's codes (8/b to a byte, else one) and
    # an fp16 scale and int32 zero
    slices = [(32 - r, bits)] + ([(r, 8)] if r else [])
    assert cache.bytes_per_position() == 2 * 3 * 2 * sum(w // (8 // b if 8 % b == 0 else 1) + 6
                                                         for w, b in slices)


@pytest.mark.parametrize("abits,kvbits,rotation", [(4, 4, "pca"), (16, 4, "pca"),
                                                    (4, 16, "pca"), (4, 4, "random")])
def test_a_saved_resq_model_gives_the_in_memory_logits(tmp_path, abits, kvbits, rotation):
    model = tiny(tmp_path)
    cfg = mixq.method_config("resq", mixq.QuantConfig(wbits=4, abits=abits, kvbits=kvbits,
                                                      rotation=rotation))
    res = resq_weights(model, cfg)
    mixq.install_resq_quantizers(model, cfg)
    qconfig = {"quant_method": "mixq", "method": "resq", "bits": 4, "group_size": -1,
               "resq": mixq.resq_config(model.args, cfg, res)}
    mixq.save_quantized(model, res, None, tmp_path / "q", qconfig)
    loaded, _ = llama.load(str(tmp_path / "q"))
    assert isinstance(loaded.layers[0].self_attn.o_proj, kernels.ResQLinear)
    with pytest.raises(llama.CheckpointError, match="a ResQ checkpoint"):  # as mixq.py's --ckpt
        mixq.start_from_dequantized(llama.load(str(tmp_path / "q"))[0], tmp_path / "q")
    x = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))  # integer sums, one rounding: the same numbers
        # decoding: the cache holds codes and gives back what the forward quantizes
        loaded.setup_cache(2, 40)
        last = loaded(x[:, :39])[:, -1:], loaded(x[:, 39:], start_pos=39)
        loaded.setup_cache(2, None)
        torch.testing.assert_close(last[1], model(x)[:, -1:], rtol=1e-4, atol=1e-4)
        # q/k/v and gate/up stacked (one input quantization each): the same numbers
        loaded.fuse_projections()
        assert isinstance(loaded.layers[0].self_attn.qkv_proj, kernels.ResQLinear)
        assert torch.equal(loaded(x), model(x))


@pytest.fixture(scope="module")
def saved_resq(tmp_path_factory):
    """ResQ W4A4KV4 of the embedded model (RTN weights, 2 x 64 calibration tokens: quick),
    evaluated in memory and saved, with a text corpus of its own."""
    tmp = tmp_path_factory.mktemp("resq")
    text = tmp / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    cfg = mixq.QuantConfig(wbits=4, w_rtn=True)
    specs = ("pydoc", f"text:{text}")
    summary = mixq.run(method="resq", cfg=cfg, nsamples=2, seqlen=64, evals=specs,
                       eval_windows=2, save=str(tmp / "q"))
    return tmp / "q", specs, summary


def test_saved_resq_model_runs_in_integers_with_the_in_memory_perplexity(saved_resq):
    ckpt, specs, summary = saved_resq
    model, tok = llama.load(str(ckpt))
    att, mlp = model.layers[3].self_attn, model.layers[3].mlp
    assert isinstance(att.q_proj, kernels.ResQLinear)
    assert isinstance(mlp.down_proj, kernels.ResQLinear) and mlp.online_hadamard is not None
    assert att.post_rope.input_bits == 8 and att.kv_quant == llama.KVQuantizer(4, 8, 8)
    assert model.lm_head.weight is not model.embed_tokens.weight  # fused apart
    loaded = mixq.metrics.evaluate(model, tok, specs, 512, 2)
    for s in specs:
        assert loaded[s]["ppl"] == pytest.approx(summary["quant"][s]["ppl"], rel=1e-3)
        assert loaded[s]["ppl"] != pytest.approx(summary["fp"][s]["ppl"], rel=1e-2)
    assert len(model.generate(tok.encode("def f(x):"), 8)) == 8  # the KV cache in codes


def test_a_resq_checkpoint_has_no_export(saved_resq, tmp_path):
    with pytest.raises(ValueError, match="no other tool runs ResQ"):
        mixq.export_quantized(saved_resq[0], "gptq", tmp_path / "x")
    with pytest.raises(ValueError, match="no other tool runs ResQ"):
        mixq.check_options(mixq.Job(method="resq", export=("gptq", str(tmp_path / "y"))),
                           mixq.QuantConfig())


def test_a_damaged_resq_checkpoint_is_refused(saved_resq, tmp_path):
    ck = tmp_path / "q"
    shutil.copytree(saved_resq[0], ck)
    cfg = json.loads((ck / "config.json").read_text())
    name = "model.layers.2.self_attn.q_proj"
    for change, msg in [(lambda c: c["quantization_config"]["resq"]["slices"].pop(name),
                         "no input slices"),
                        (lambda c: c["quantization_config"]["resq"]["slices"][name][0].update(
                            bits=8), r"q_proj: qweight_0 \("),
                        (lambda c: c["quantization_config"].update(format="other"),
                         "packed as 'other'"),
                        (lambda c: c["quantization_config"]["resq"].pop("kvbits"), "kvbits")]:
        bad = json.loads(json.dumps(cfg))
        change(bad)
        (ck / "config.json").write_text(json.dumps(bad))
        with pytest.raises(llama.CheckpointError, match=msg):
            llama.load(str(ck))
