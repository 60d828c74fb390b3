"""kernels.py: the Triton GEMM against the torch reference (CPU interpreter, small shapes)."""

import pytest
import torch
from hypothesis import given, strategies as st

import kernels
import mixq

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() and not kernels.os.environ.get("TRITON_INTERPRET") \
    else "cpu"


def random_packed(bits, N, Kd, groupsize, outliers, seed):
    """A random weight in the packed format, with about `outliers` of it in CSR corrections."""
    g = torch.Generator().manual_seed(seed)
    gs = Kd if groupsize == -1 else groupsize
    t = kernels.pack_codes(torch.randint(0, 2 ** bits, (Kd, N), generator=g), bits)
    G = -(-Kd // gs)  # ceil: a partial last group where gs does not divide Kd
    t["scales"] = (torch.rand(G, N, generator=g) * 0.1 + 0.01).half()
    t["zeros"] = torch.randint(0, 2 ** bits, (G, N), generator=g).half()
    if outliers:
        mask = torch.rand(N, Kd, generator=g) < outliers
        mask[0, :] = True  # one dense row: the skewed case
        t |= kernels.to_csr(torch.randn(N, Kd, generator=g), mask)
    return {k: v.to(DEVICE) for k, v in t.items()}


def check(bits, M, N, Kd, groupsize, outliers, dtype, seed, config=None):
    t = random_packed(bits, N, Kd, groupsize, outliers, seed)
    x = torch.randn(M, Kd, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    y = kernels.quant_matmul(x, t, bits, groupsize, N, Kd, config)
    ref = x.double() @ kernels.dequantize(t, bits, groupsize, N, Kd).double().T  # the oracle, fp64
    assert y.dtype == dtype and y.shape == (M, N)
    assert torch.isfinite(y).all()  # every element written (single-split outputs start as NaN)
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), float(err)


@given(bits=st.sampled_from([2, 3, 4, 8]), M=st.integers(1, 20), N=st.integers(1, 80),
       k_words=st.sampled_from([1, 3, 5]), groupsize=st.sampled_from([-1, 32, 64]),
       outliers=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 1000))
def test_kernel_equals_reference_on_odd_shapes(bits, M, N, k_words, groupsize, outliers, seed):
    Kd = 32 * k_words  # 32, 96, 160: not multiples of BLOCK_K = 64 (nor of g = 64: a partial
    check(bits, M, N, Kd, groupsize, outliers, torch.float16, seed)  # last group)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])  # each width every run (3: the two planes)
@given(M=st.integers(1, 20), N=st.integers(1, 70), k_words=st.sampled_from([1, 2, 3]),
       groupsize=st.sampled_from([-1, 32, 64]), outliers=st.sampled_from([0.0, 0.05]),
       seed=st.integers(0, 1000))
def test_simple_kernel_equals_reference_and_fast_path(bits, M, N, k_words, groupsize, outliers,
                                                      seed):
    # the readable kernel against the torch oracle (dequantize) and against the fast path
    # config_for picks for M (GEMV at M = 1, the GEMM above); K = 32, 64, 96: tiles cut by K,
    # and at K = 96 groups of 64 leave a partial last group
    Kd = 32 * k_words
    t = random_packed(bits, N, Kd, groupsize, outliers, seed)
    x = torch.randn(M, Kd, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    y = kernels.simple_quant_matmul(x, t, bits, groupsize, N, Kd)
    ref = x.double() @ kernels.dequantize(t, bits, groupsize, N, Kd).double().T
    assert y.dtype == x.dtype and y.shape == (M, N)
    scale = ref.abs().max()
    assert (y.double() - ref).abs().max() / scale < 1e-5  # fp32 products and sums
    fast = kernels.quant_matmul(x.half(), t, bits, groupsize, N, Kd)
    assert (fast.double() - y.double()).abs().max() / scale < 2e-3  # fp16 output


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_dtypes(bits, dtype):
    check(bits, 3, 48, 128, 64, 0.01, dtype, seed=bits)


@pytest.mark.parametrize("groupsize", [16, 64, 80])
@pytest.mark.parametrize("config", [
    dict(path="gemv", BLOCK_N=32, BLOCK_K=32, ITERS=1),
    dict(path="gemv", BLOCK_N=64, BLOCK_K=64, ITERS=2),
    dict(path="gemv", BLOCK_N=8, BLOCK_K=32, ITERS=2),  # tiles divide N = 40, K = 192: no masks
    dict(path="gemv", BLOCK_N=8, BLOCK_K=32, ITERS=1, fused_outliers=False),
    dict(path="gemv", BLOCK_N=8, BLOCK_K=32, ITERS=1, sum_rows=True),  # runs per program
    dict(path="gemv", BLOCK_N=8, BLOCK_K=64, ITERS=3, sum_rows=True),  # one split: the dense
    # row's run of 192 outliers crosses a 128-entry chunk
    kernels.config_for(1, 14336, 4096, 128),  # the MLP matrices' decode tile (masked to N = 40)
    dict(path="gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1),
    dict(path="gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=3),
    dict(path="gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, swap=True),  # y^T = W x^T
    dict(path="gemm", BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=2, swap=True),
    dict(path="dequant", BLOCK_N=32, BLOCK_K=64)], ids=lambda c: "-".join(map(str, c.values())))
def test_every_path(config, groupsize):
    # each path forced on a small shape; groups of 16 are smaller than every K-tile (statistics
    # per element), groups of 64 hold whole tiles (one row of statistics per tile), groups of
    # 80 end in a partial one (192 = 80 + 80 + 32)
    M = 1 if config["path"] == "gemv" else 17
    for bits in (2, 3, 4, 8):
        check(bits, M, 40, 192, groupsize, 0.02, torch.float16, seed=M + bits, config=config)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_wide_decode_tile_on_whole_tiles(bits):
    # the MLP matrices' GEMV tile where it divides N and K (no masks: the EVEN path), with
    # outliers and split K over two programs
    cfg = kernels.config_for(1, 14336, 4096, 128)
    check(bits, 1, cfg["BLOCK_N"], 2 * cfg["BLOCK_K"] * cfg["ITERS"], 64, 0.01, torch.float16,
          seed=bits, config=cfg)


@pytest.mark.parametrize("bits", [3, 4])
def test_stacked_quant_linears_equal_the_separate_ones(bits):
    # model.fuse_projections stacks q/k/v (gate/up) QuantLinears along N: codes, scales and
    # zeros side by side, CSR rows one after another (here the middle one has no outliers);
    # through the kernels (decode GEMV, small-batch GEMM) and the torch path, the stacked
    # output is the separate outputs side by side
    sizes, outliers = [24, 8, 16], [0.05, 0.0, 0.1]
    lins = [kernels.QuantLinear(96, n, bits, 32, random_packed(bits, n, 96, 32, o, seed=n))
            for n, o in zip(sizes, outliers)]
    stacked = kernels.stack_quant_linears(lins)
    assert stacked.out_features == 48 and stacked.outlier_vals.numel() == sum(
        m.outlier_vals.numel() for m in lins if hasattr(m, "outlier_vals"))
    for M in (1, 3):
        x = torch.randn(M, 96, generator=torch.Generator().manual_seed(M)).to(DEVICE)
        parts = [kernels.quant_matmul(x, m.stored(), bits, 32, m.out_features, 96) for m in lins]
        y = kernels.quant_matmul(x, stacked.stored(), bits, 32, 48, 96)
        torch.testing.assert_close(y, torch.cat(parts, dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked.dequantized_weight(),
                               torch.cat([m.dequantized_weight() for m in lins]))
    other = kernels.QuantLinear(96, 8, 2, 32, random_packed(2, 8, 96, 32, 0.0, seed=0))
    assert kernels.stack_quant_linears([lins[0], other]) is None  # different bits: not stackable


def test_quantized_linear_refuses_fractional_or_far_zero_points():
    t = random_packed(4, 8, 64, 32, 0.0, seed=0)
    for zeros in (t["zeros"] + 0.5, t["zeros"] - 1025):
        with pytest.raises(ValueError, match="integer zero points"):
            kernels.QuantLinear(64, 8, 4, 32, t | {"zeros": zeros})
    kernels.QuantLinear(64, 8, 4, 32, t | {"zeros": t["zeros"] - 1024})  # the edge of the range


def test_quantized_linear_triton_path_equals_torch_path():
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    S = torch.eye(128) + 0.1
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.01
    qz = mixq.gptq(W, S, mixq.QuantConfig(wbits=3, groupsize=32), mask=mask)
    lin = kernels.QuantLinear(128, 48, 3, 32, mixq.packed_tensors(qz)).to(DEVICE)
    x = torch.randn(2, 5, 128).to(DEVICE)
    via_torch = torch.nn.functional.linear(x, lin.dequantized_weight())
    via_triton = kernels.quant_matmul(x, lin.stored(), 3, 32, 48, 128)
    assert via_triton.shape == (2, 5, 48)
    assert torch.allclose(via_triton, via_torch, rtol=1e-4, atol=1e-4)


@given(m=st.integers(1, 40), n=st.integers(2, 70), data=st.data(), bits=st.sampled_from([2, 3, 4]),
       rounded=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 1000))
def test_quantease_block_kernel_equals_the_torch_loop(m, n, data, bits, rounded, dtype, seed):
    # one block of a QuantEase sweep, at an offset and of a width that is not a power of two
    b1 = data.draw(st.integers(0, n - 1))
    b2 = data.draw(st.integers(b1 + 1, min(n, b1 + 128)))
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=dtype)
    X = torch.randn(n, 3 * n, generator=g, dtype=dtype)
    S = mixq.normalized_offdiag(X @ X.T)
    s, z, gs = mixq.fit_groups(W, mixq.QuantConfig(wbits=bits))
    s, z = mixq.per_column(s, gs, n), mixq.per_column(z, gs, n)
    What = W + 0.1 * torch.randn(m, n, generator=g, dtype=dtype)
    R = (W + W @ S - What @ S)[:, b1:b2]
    ref = What.clone()
    D_ref = mixq.cd_block(ref, R, S, s, z, b1, b2, 2 ** bits - 1, rounded)
    out = What.clone().to(DEVICE)
    D = kernels.cd_block(out, R.to(DEVICE), S.to(DEVICE), s.to(DEVICE), z.to(DEVICE), b1, b2,
                   2 ** bits - 1, rounded)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    if rounded and dtype == torch.float32:  # summation order may flip a rare rounding
        assert (out.cpu() != ref).float().mean() < 0.02
    else:
        torch.testing.assert_close(out.cpu(), ref, **tol)
        torch.testing.assert_close(D.cpu(), D_ref, **tol)
    assert torch.equal(out[:, :b1].cpu(), What[:, :b1])  # outside the block: untouched
    assert torch.equal(out[:, b2:].cpu(), What[:, b2:])


def test_quantease_block_kernel_rounds_ties_to_even_like_torch():
    # S = 0: u = R, so the block is plain rounding; R on exact half-steps of the grid
    R = torch.arange(-2, 18, dtype=torch.float32).view(1, -1) * 0.25 + 0.125  # halves of s = 0.25
    m, n = R.shape
    s, z = torch.full((m, n), 0.25), torch.full((m, n), 1.0)
    out = torch.zeros(m, n).to(DEVICE)
    kernels.cd_block(out, R.to(DEVICE), torch.zeros(n, n).to(DEVICE), s.to(DEVICE), z.to(DEVICE),
               0, n, 3)
    assert torch.equal(out.cpu(), mixq.fake_quant(R, s, z, 3))


@given(m=st.integers(1, 40), width=st.integers(1, 70), bits=st.sampled_from([2, 3, 4]),
       mixed=st.booleans(), spqr=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 1000))
def test_gptq_block_kernel_equals_the_torch_loop(m, width, bits, mixed, spqr, dtype, seed):
    # one block of GPTQ columns: kept weights, per-column bit widths (ResQ), SpQR's threshold
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, width, generator=g, dtype=dtype)
    X = torch.randn(width, 2 * width + 4, generator=g, dtype=dtype)
    U, _ = mixq.inverse_cholesky(2 * X @ X.T, 0.01)
    s, z, _ = mixq.fit_groups(W, mixq.QuantConfig(wbits=bits))
    s, z = s.expand(m, width).contiguous(), z.expand(m, width).contiguous()
    maxq = torch.full((width,), 2.0 ** bits - 1, dtype=dtype)
    if mixed:
        maxq[torch.rand(width, generator=g) < 0.3] = 255.0
    mask = torch.rand(m, width, generator=g) < 0.05
    tau = 0.1 * float((W.var(0) / torch.diag(U) ** 2).mean()) if spqr and m > 1 else float("inf")
    ref = mixq.gptq_block(W.clone(), U, s, z, maxq, mask, tau)
    dev = [t.to(DEVICE) for t in (W, U, s, z, maxq, mask)]
    out = [t.cpu() for t in kernels.gptq_block(*dev, tau)]
    assert torch.equal(out[3], ref[3]) or dtype == torch.float32  # the same weights kept
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    if dtype == torch.float32:  # summation order may flip a rare rounding
        assert (out[0] != ref[0]).float().mean() < 0.02
    else:
        for a, b in zip(out[:3], ref[:3]):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", ["gptq g32", "gptq g40", "gptq act-order", "gptq static act-order",
                                  "spqr", "resq high", "tacq", "quantease", "quantease outliers"])
def test_solvers_through_the_kernels_equal_the_torch_solvers(name):
    # the glue around the block kernels (grids gathered per column, block sizes, permutations)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 96, generator=g, dtype=torch.float64)
    X = torch.randn(96, 200, generator=g, dtype=torch.float64)
    H = X @ X.T / 200
    mask = torch.rand(W.shape, generator=g) < 0.03
    high = torch.zeros(96, dtype=torch.bool)
    high[::8] = True
    Q = mixq.QuantConfig

    def run(dev, gb, cb):  # gb, cb: GPTQ's and QuantEase's column loops
        W_, H_, mask_, high_ = (t.to(dev) for t in (W, H, mask, high))
        return {"gptq g32": lambda: mixq.gptq(W_, H_, Q(wbits=3, groupsize=32), block=gb),
                # 96 columns in groups of 40: a partial last group of 16
                "gptq g40": lambda: mixq.gptq(W_, H_, Q(wbits=3, groupsize=40), block=gb),
                "gptq act-order": lambda: mixq.gptq(W_, H_, Q(wbits=2, groupsize=32,
                                                              act_order=True), block=gb),
                "gptq static act-order": lambda: mixq.gptq(W_, H_, Q(
                    wbits=2, groupsize=32, act_order=True, static_groups=True), block=gb),
                "spqr": lambda: mixq.gptq(W_, H_, mixq.spqr_config(Q(wbits=3)), block=gb),
                "resq high": lambda: mixq.gptq(W_, H_, Q(wbits=4), high=high_, block=gb),
                "tacq": lambda: mixq.gptq(W_, H_, Q(wbits=2, mse=True), mask=mask_, block=gb),
                "quantease": lambda: mixq.quantease(W_, H_, Q(
                    wbits=3, groupsize=32, iters=3, blocksize=40), block=cb),
                "quantease outliers": lambda: mixq.quantease_outliers(
                    W_, H_, Q(wbits=2, iters=2, outliers=0.02), block=cb)}[name]()
    ref = run("cpu", mixq.gptq_block, mixq.cd_block)  # the torch loops
    out = run(DEVICE, kernels.gptq_block, kernels.cd_block)  # the kernels (interpreted on a CPU)
    torch.testing.assert_close(out.dequantize().cpu(), ref.dequantize(), rtol=1e-10, atol=1e-10)
    assert out.n_kept() == ref.n_kept() and out.loss == pytest.approx(ref.loss, rel=1e-9)


def test_the_pipeline_picks_the_column_loops_by_device(monkeypatch):
    # mixq.solve, the seam: kernels.py's loops where kernels.use_triton says the device runs
    # them (a GPU), the torch loops elsewhere
    picked = []
    monkeypatch.setattr(mixq, "gptq", lambda *a, block=None, **k: picked.append(block))
    monkeypatch.setattr(mixq, "quantease", lambda *a, block=None, **k: picked.append(block))
    W, S = torch.randn(8, 64), torch.eye(64)
    for gpu in (False, True):
        monkeypatch.setattr(kernels, "use_triton", lambda x: gpu)
        mixq.solve("gptq", W, S, mixq.QuantConfig())
        mixq.solve("quantease", W, S, mixq.QuantConfig())
    assert picked == [mixq.gptq_block, mixq.cd_block, kernels.gptq_block, kernels.cd_block]


@pytest.mark.parametrize("bits,outliers", [(3, 0.05), (4, 0.0)])
def test_quant_matmul_op_is_opaque_to_torch_compile(bits, outliers):
    # QuantLinear calls the kernels through one custom operator, so a compiled decoding step
    # (static_decoder(compile=True)) keeps the Triton launches as they are: a fullgraph compile
    # through it (the interpreter standing in for the GPU) gives the eager result exactly, and
    # the operator passes torch's own checks of its schema and fake (shape-only) version
    N, Kd = 40, 96
    t = random_packed(bits, N, Kd, 32, outliers, seed=bits)
    if outliers:
        t["outlier_rows"] = kernels.outlier_rows(t)
    names = ["qweight", "qweight_hi", "scales", "zeros", "outlier_rowptr", "outlier_cols",
             "outlier_vals", "outlier_rows"]
    workspace = kernels.new_workspace(N, DEVICE)
    args = [t.get(n) for n in names] + [workspace, bits, 32, N, Kd]
    x = torch.randn(1, Kd, generator=torch.Generator().manual_seed(7)).to(DEVICE, torch.float16)
    eager = kernels.quant_matmul_op(x, *args)
    assert torch.equal(eager, kernels.quant_matmul(x, t, bits, 32, N, Kd))
    compiled = torch.compile(lambda x: kernels.quant_matmul_op(x, *args) * 2, fullgraph=True)(x)
    assert torch.equal(compiled, eager * 2)
    torch.library.opcheck(kernels.quant_matmul_op, (x, *args),  # (also: no argument changed)
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bits,outliers", [(4, 0.0), (3, 0.05)])
def test_gemv_leaves_its_workspace_at_zero(bits, outliers):
    # the split-K GEMV is one launch: its programs add into the workspace and count themselves,
    # and the last one per column block writes y and clears the workspace and the count. One
    # workspace then serves every call (QuantLinear keeps one); a dirty one would corrupt the
    # next call. 3 column blocks x 6 K-splits, four calls in a row on one workspace.
    N, Kd = 40, 192
    t = random_packed(bits, N, Kd, 32, outliers, seed=bits)
    workspace = kernels.new_workspace(N, DEVICE)
    cfg = dict(path="gemv", BLOCK_N=16, BLOCK_K=32, ITERS=1)
    for seed in range(4):
        x = torch.randn(1, Kd, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        y = kernels.quant_matmul(x, t, bits, 32, N, Kd, cfg, workspace=workspace)
        ref = x.double() @ kernels.dequantize(t, bits, 32, N, Kd).double().T
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        assert not workspace.any(), workspace


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU (MIXQ_TEST_GPU=1): real concurrency")
def test_gemv_workspace_survives_many_calls_on_a_gpu():
    # the interpreter runs programs one after another, so only a GPU tests the split-K
    # epilogue's memory ordering (relaxed adds, the acq_rel count, the last program's read):
    # a Llama-sized GEMV with outliers, 200 calls on one workspace (eager and in a CUDA graph),
    # each checked against the fp64 reference
    N, Kd = 4096, 4096
    t = random_packed(4, N, Kd, 128, 0.0035, seed=11)
    t["outlier_rows"] = kernels.outlier_rows(t)
    W = kernels.dequantize(t, 4, 128, N, Kd).double()
    workspace = kernels.new_workspace(N, DEVICE)
    xs = torch.randn(100, 1, Kd, device=DEVICE).half()
    x = torch.empty(1, Kd, device=DEVICE, dtype=torch.float16)
    for i in range(100):
        x.copy_(xs[i])
        y = kernels.quant_matmul(x, t, 4, 128, N, Kd, workspace=workspace)
        err = (y.double() - x.double() @ W.T).abs().max() / (x.double() @ W.T).abs().max()
        assert err < 2e-3, (i, float(err))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.quant_matmul(x, t, 4, 128, N, Kd, workspace=workspace)
    for i in range(100):
        x.copy_(xs[i])
        graph.replay()
        err = (y.double() - x.double() @ W.T).abs().max() / (x.double() @ W.T).abs().max()
        assert err < 2e-3, (i, float(err))
    assert not workspace.any()


@given(bits=st.sampled_from([2, 3, 4, 8]), N=st.integers(1, 80), k_words=st.sampled_from([1, 3, 4]),
       groupsize=st.sampled_from([16, 32, 64, -1]), seed=st.integers(0, 1000))
def test_dequantized_tiles_are_rounded_once(bits, N, k_words, groupsize, seed):
    # the tiles the GEMM and the prefill path multiply: s (q - z) from the codes as fp16
    # 1024 + q (two per register), the product in fp16 for fp16 activations, else in fp32;
    # either way every weight is the exact dequantization rounded once to the dtype (bf16
    # only on a GPU: the interpreter truncates fp32 to bf16; scales from 2^-14 to 2^8 times
    # those of random_packed reach fp16's subnormals and the rounding of large products)
    Kd = 32 * k_words
    if groupsize != -1 and Kd % groupsize:
        groupsize = -1
    t = random_packed(bits, N, Kd, groupsize, 0.0, seed)
    g = torch.Generator().manual_seed(seed)
    t["scales"] = (t["scales"].cpu().float() * 2.0 ** torch.randint(
        -14, 9, t["scales"].shape, generator=g)).half().to(DEVICE)
    ref = kernels.dequantize(t, bits, groupsize, N, Kd).T  # (K, N) fp32, exact
    for dtype in [torch.float16, torch.float32] + [torch.bfloat16] * (DEVICE == "cuda"):
        wt = kernels.dequantize_t(t, bits, groupsize, N, Kd, dtype)
        assert wt.dtype == dtype and torch.equal(wt, ref.to(dtype)), dtype


def test_every_kernel_compiles_for_the_h100():
    # the interpreter never compiles; Triton's compiler and ptxas (in the triton wheel) need no
    # GPU, so compile-only errors show up here (sm_90, the configurations config_for picks)
    pytest.importorskip("triton.backends.nvidia.compiler")
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "compile_kernels.py"
    env = {k: v for k, v in kernels.os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| ") and "registers" not in ln]
    assert len(rows) == 17  # every kernel of kernels.py, each with its ptxas numbers
    # the decode GEMV keeps every word in the layout it was loaded in: no CTA barrier (a
    # shuffle through shared memory) and no memory fence while the weights stream in (its
    # split-K epilogue, after the last weight load, has them once per program); it
    # decodes codes without int-to-float instructions, and its arithmetic keeps denormals (its
    # decode reads masked codes as denormal floats)
    cells = lambda r: [c.strip() for c in r.split("|")[-5:-1]]  # BAR / MEMBAR, I2F, FTZ, STS.U16
    gemv = [cells(r) for r in rows if r.startswith("| gemv")]
    assert len(gemv) == 7 and all(c[:3] == ["0 / 0", "0", "0"] for c in gemv), gemv
    # no kernel that dequantizes weights converts them with I2F (the magic-number conversion),
    # and the tensor-core GEMM's dequantized tiles reach shared memory in wide stores, not a
    # 2-byte store per weight (kernels._fields)
    dequantizing = [cells(r) for r in rows if r.startswith(("| gemm", "| dequant"))]
    assert len(dequantizing) == 5 and all(c[1] == "0" and c[3] == "0" for c in dequantizing), rows


def test_quantized_tiny_llama_generates_the_same_through_the_kernels(tmp_path, monkeypatch):
    # end to end on a checkpoint: prompt through the small-batch GEMM, decoding through the GEMV,
    # 16-bit outliers through their kernel; against the torch path of the same QuantLinears,
    # then again with the projections fused
    from conftest import tiny_checkpoint
    import model as llama
    d = tmp_path / "m"
    tiny_checkpoint(d)
    model, _ = llama.load(str(d))
    calib = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    cfg = mixq.QuantConfig(wbits=3, groupsize=32, iters=2, outliers=0.01)
    res = mixq.quantize_model(model, calib, "quantease", cfg, log=lambda s: None)
    qc = {"quant_method": "mixq", "bits": 3, "group_size": 32, "modules": sorted(res)}
    mixq.save_quantized(model, res, None, tmp_path / "q", qc)
    back, _ = llama.load(str(tmp_path / "q"))
    back.to(DEVICE)
    prompt = [5, 17, 33, 8, 90, 2, 41]
    one, seven = torch.tensor([prompt[:1]], device=DEVICE), torch.tensor([prompt], device=DEVICE)
    via_torch = back.generate(prompt, 6, stop_ids=[])
    logits_torch = back(one), back(seven)  # M = 1 (the GEMV) and M = 7 (the GEMM)
    monkeypatch.setattr(kernels, "use_triton", lambda x: True)  # the kernels (interpreted on a CPU)
    assert back.generate(prompt, 6, stop_ids=[]) == via_torch
    for x, ref in zip((one, seven), logits_torch):
        torch.testing.assert_close(back(x), ref, rtol=1e-4, atol=1e-4)
    back.fuse_projections()  # q/k/v and gate/up stacked: one kernel launch each
    assert isinstance(back.layers[0].self_attn.qkv_proj, kernels.QuantLinear)
    assert back.generate(prompt, 6, stop_ids=[]) == via_torch
    for x, ref in zip((one, seven), logits_torch):
        torch.testing.assert_close(back(x), ref, rtol=1e-4, atol=1e-4)


def test_quantized_linear_on_the_cpu_dequantizes_once_per_dtype():
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    qz = mixq.rtn(W, mixq.QuantConfig(wbits=4, groupsize=32))
    lin = kernels.QuantLinear(64, 24, 4, 32, mixq.packed_tensors(qz))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    expected = x @ qz.dequantize().T
    torch.testing.assert_close(lin(x), expected)
    kept = lin.dense
    lin(x)
    assert lin.dense is kept  # the second call reuses the dequantized weight
    y = lin(x.double())  # another dtype: dequantized again, in that dtype
    assert lin.dense.dtype == torch.float64 and y.dtype == torch.float64
    torch.testing.assert_close(y, expected.double(), rtol=1e-5, atol=1e-5)


# -- ResQ's integer product ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@given(M=st.integers(1, 40), N=st.integers(1, 80), k_words=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 1000))
def test_int_matmul_kernel_is_the_exact_integer_product(bits, M, N, k_words, seed):
    # int8 codes times packed signed weight codes, accumulated in int32: bit for bit the int64
    # product, with K cut by the tile (32, 64, 96 against BLOCK_K = 64) and the extreme codes in
    K = 32 * k_words
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    a[0] = -128
    codes = torch.randint(0, 2 ** bits, (K, N), generator=g)
    codes[:, 0] = 0  # qw = -2^(bits-1) against a = -128: the largest products
    qweight = kernels.pack(codes, bits)
    ref = kernels.int_matmul_reference(a, qweight, bits)
    assert torch.equal(ref.long(), a.long() @ (codes - 2 ** (bits - 1)))
    assert torch.equal(kernels.int_matmul(a.to(DEVICE), qweight.to(DEVICE), bits).cpu(), ref)
    assert torch.equal(torch._int_mm(a, kernels.signed_codes(qweight, bits, K)), ref)


@given(seed=st.integers(0, 10 ** 6), big=st.booleans())
def test_scaled_sums_are_rounded_once(seed, big):
    # P ss with ss a product of two fp16 values: fp32 while P is exact as a float, fp64 beyond
    # (big: sums past 2^24); both round the exact product once
    g = torch.Generator().manual_seed(seed)
    limit = 2 ** 30 if big else 2 ** 24
    P = torch.randint(-limit, limit + 1, (7, 9), generator=g, dtype=torch.int32)
    sx = (torch.rand(7, 1, generator=g) * 1e-2).half().float()
    sw = (torch.rand(9, generator=g) * 1e-2).half().float()
    exact = (P.double() * (sx.double() * sw.double())).float()
    assert torch.equal(kernels.scaled(P, sx * sw), exact)
