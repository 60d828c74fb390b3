"""The quantization algorithms as pure functions: each fast version against the paper's, and the
invariants of the grid, RTN, GPTQ, SpQR-style outliers, QuantEase and the bit count."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import kernels
import mixq

DT = torch.float64  # exactness tests run in fp64


def fp16_exact(x):
    """Values that fp16 represents exactly (weights kept in 16 bits are stored in fp16)."""
    return x.half().to(DT)


def random_problem(seed, m=8, n=64, tokens=256, correlated=True):
    """W (m, n) and Sigma = X X^T / N (n, n) from correlated inputs X = Z A."""
    g = torch.Generator().manual_seed(seed)
    W = fp16_exact(torch.randn(m, n, generator=g, dtype=DT))
    Z = torch.randn(tokens, n, generator=g, dtype=DT)
    X = Z @ torch.randn(n, n, generator=g, dtype=DT) if correlated else Z
    return W, X.T @ X / tokens


# groups of 48 on the problems' 64 columns: one of 48 and a partial last group of 16
configs = st.builds(mixq.QuantConfig, wbits=st.integers(2, 8),
                    groupsize=st.sampled_from([-1, 16, 32, 48]), sym=st.booleans())


# -- grid and RTN ---------------------------------------------------------------------------------


@given(cfg=configs, seed=st.integers(0, 10 ** 6))
def test_rtn_error_at_most_half_a_step_and_on_grid(cfg, seed):
    W, _ = random_problem(seed)
    qz = mixq.rtn(W, cfg)
    g = qz.groupsize
    s = mixq.per_column(qz.scales, g, W.shape[1])  # (m, n)
    Wq = qz.dequantize()
    assert ((W - Wq).abs() <= s / 2 + 1e-12).all()  # |w - Q(w)| <= s/2
    assert torch.equal(qz.codes, qz.codes.round()) and qz.codes.min() >= 0
    assert qz.codes.max() <= cfg.maxq  # every entry is s * (integer in [0, maxq] - z)
    # idempotent with the same grid
    z = mixq.per_column(qz.zeros, g, W.shape[1])
    assert torch.equal(mixq.fake_quant(Wq, s, z, cfg.maxq), Wq)


@given(cfg=configs, seed=st.integers(0, 10 ** 6))
def test_zero_is_exact(cfg, seed):
    W, _ = random_problem(seed)
    W[:, ::5] = 0
    assert (mixq.rtn(W, cfg).dequantize()[:, ::5] == 0).all()


def test_scales_are_fp16_and_cover_the_range():
    W, _ = random_problem(0)
    qz = mixq.rtn(W, mixq.QuantConfig(wbits=4, groupsize=16))
    assert torch.equal(qz.scales, qz.scales.half().to(DT))
    # no clipping without --mse: every weight within half a step of its grid point
    step = mixq.per_column(qz.scales, 16, W.shape[1])
    assert ((qz.dequantize() - W).abs() <= step / 2 * (1 + 1e-9)).all()


@given(seed=st.integers(0, 10 ** 6), bits=st.integers(2, 4))
def test_mse_clipping_never_worse_in_its_norm(seed, bits):
    W, _ = random_problem(seed)
    err = {}
    for mse in (False, True):
        qz = mixq.rtn(W, mixq.QuantConfig(wbits=bits, mse=mse))
        err[mse] = ((qz.dequantize() - W).abs() ** 2.4).sum(1)
    assert (err[True] <= err[False] + 1e-9).all()


def test_per_channel_rtn_invariant_to_column_permutation():
    W, _ = random_problem(1)
    perm = torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(0))
    cfg = mixq.QuantConfig(wbits=3)
    assert torch.equal(mixq.rtn(W[:, perm], cfg).dequantize(), mixq.rtn(W, cfg).dequantize()[:, perm])


@given(seed=st.integers(0, 10 ** 6), n=st.integers(1, 80), g=st.integers(1, 100),
       bits=st.integers(2, 4))
def test_a_partial_last_group_is_a_group_of_its_own(seed, n, g, bits):
    # where g does not divide n, columns k*g .. n-1 form the last group: each group's grid is
    # the one RTN fits on its columns alone
    W, _ = random_problem(seed, n=n, tokens=1)
    qz = mixq.rtn(W, mixq.QuantConfig(wbits=bits, groupsize=g))
    assert qz.scales.shape == (W.shape[0], math.ceil(n / g))
    for c in range(0, n, g):
        alone = mixq.rtn(W[:, c:c + g], mixq.QuantConfig(wbits=bits))
        assert torch.equal(qz.dequantize()[:, c:c + g], alone.dequantize())


def test_bits_outside_2_to_8_are_refused():
    with pytest.raises(ValueError, match="2-8 bits"):
        mixq.QuantConfig(wbits=1)


@pytest.mark.parametrize("option,value", [("percdamp", -0.1), ("iters", 0), ("init", "zero"),
                                          ("outliers", 1.5), ("outlier_threshold", -0.1),
                                          ("ratio", -0.01), ("abits", 1), ("kvbits", 17),
                                          ("high_fraction", 1.0), ("rotation", "hadamard")])
def test_config_refuses_out_of_range_options(option, value):
    with pytest.raises(ValueError, match=f"--{option.replace('_', '-')} {value}: want"):
        mixq.QuantConfig(**{option: value})


# -- GPTQ --------------------------------------------------------------------------------------


@given(cfg=configs, seed=st.integers(0, 10 ** 6), blocksize=st.sampled_from([16, 128]),
       mse=st.booleans())
def test_gptq_is_the_papers_column_loop(cfg, seed, blocksize, mse):
    # gptq (lazy blocks, segments refitted at group starts) = Algorithm 1, one column at a time
    W, S = random_problem(seed, n=96)
    W[:, 5] = 0
    S[7, :], S[:, 7] = 0, 0  # a dead input
    cfg = mixq.QuantConfig(**{**vars(cfg), "blocksize": blocksize, "mse": mse})
    torch.testing.assert_close(mixq.gptq(W, 2 * S, cfg).dequantize(),
                               mixq.gptq_paper(W, 2 * S, cfg), rtol=1e-9, atol=1e-9)


@given(cfg=configs, seed=st.integers(0, 10 ** 6), act_order=st.booleans())
def test_gptq_loss_identity(cfg, seed, act_order):
    # tr((W - Q) H_damped (W - Q)^T) = ||E||^2, E the scaled errors
    W, S = random_problem(seed)
    H = 2 * S
    cfg = mixq.QuantConfig(**{**vars(cfg), "act_order": act_order})
    qz = mixq.gptq(W, H, cfg)
    lam = cfg.percdamp * torch.diag(H).mean()
    Hd = H + lam * torch.eye(H.shape[0], dtype=DT)
    assert mixq.layer_loss(W, qz.dequantize(), Hd) == pytest.approx(qz.loss, rel=1e-8)


@given(seed=st.integers(0, 10 ** 6), groupsize=st.sampled_from([-1, 16, 24, 48]),
       blocksize=st.sampled_from([8, 16, 20, 32, 64, 1000]), mask=st.booleans(),
       spqr=st.booleans())
def test_gptq_lazy_batches_do_not_change_the_result(seed, groupsize, blocksize, mask, spqr):
    # the block size only reorders the arithmetic (each group's grid is fitted on the same
    # fully updated weights; gptq shrinks a block that a group would straddle to gcd(B, g)):
    # fp64 results agree with one column per block
    W, S = random_problem(seed, n=104)  # groups of 16, 24 and 48 with a partial last one
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed)) < 0.05 \
        if mask else None
    tau = 0.5 if spqr else math.inf
    a, b = (mixq.gptq(W, S, mixq.QuantConfig(wbits=3, groupsize=groupsize, blocksize=B,
                                       outlier_threshold=tau), mask=keep) for B in (1, blocksize))
    torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=1e-9, atol=1e-9)
    assert torch.equal(a.codes, b.codes) and a.n_kept() == b.n_kept()


@given(cfg=configs, seed=st.integers(0, 10 ** 6))
def test_gptq_with_identity_hessian_is_rtn(cfg, seed):
    W, _ = random_problem(seed)
    cfg = mixq.QuantConfig(**{**vars(cfg), "percdamp": 0.0})
    H = torch.eye(W.shape[1], dtype=DT)
    assert torch.equal(mixq.gptq(W, H, cfg).dequantize(), mixq.rtn(W, cfg).dequantize())


@given(seed=st.integers(0, 10 ** 6), bits=st.integers(2, 4),
       groupsize=st.sampled_from([-1, 16, 32]))
def test_gptq_act_order_is_gptq_on_permuted_columns(seed, bits, groupsize):
    # act-order with dynamic groups (the reference's default): each group is the next g columns
    # in the order of decreasing diag(H), so it is plain GPTQ on the permuted problem
    W, S = random_problem(seed)
    cfg = mixq.QuantConfig(wbits=bits, groupsize=groupsize)
    perm = torch.argsort(torch.diag(S), descending=True)
    qz = mixq.gptq(W, S, mixq.QuantConfig(**{**vars(cfg), "act_order": True}))
    b = mixq.gptq(W[:, perm], S[perm][:, perm], cfg).dequantize()[:, torch.argsort(perm)]
    assert torch.allclose(qz.dequantize(), b, atol=1e-10)
    if groupsize != -1:  # the grid of column perm[i] is grid i // g
        assert torch.equal(qz.col_group[perm], torch.arange(64) // groupsize)


@given(seed=st.integers(0, 10 ** 6), act_order=st.booleans(), groupsize=st.sampled_from([16, 32]))
def test_gptq_static_groups_are_fitted_on_the_original_columns(seed, act_order, groupsize):
    W, S = random_problem(seed)
    cfg = mixq.QuantConfig(wbits=3, groupsize=groupsize, act_order=act_order, static_groups=True)
    qz = mixq.gptq(W, S, cfg)
    s, z, _ = mixq.fit_groups(W, cfg)  # contiguous groups of the weights before any update
    assert torch.equal(qz.scales, s) and torch.equal(qz.zeros, z) and qz.col_group is None
    dynamic = mixq.gptq(W, S, mixq.QuantConfig(wbits=3, groupsize=groupsize, act_order=act_order))
    assert not torch.equal(dynamic.scales, s)  # refitted on the error-updated weights


@given(cfg=configs, seed=st.integers(0, 10 ** 6))
def test_gptq_scale_invariance(cfg, seed):
    W, S = random_problem(seed)
    assert torch.equal(mixq.gptq(W, S, cfg).codes, mixq.gptq(W, 4.0 * S, cfg).codes)


@given(cfg=configs, seed=st.integers(0, 10 ** 6))
def test_gptq_mask_all_gives_w_and_empty_mask_gives_gptq(cfg, seed):
    W, S = random_problem(seed)
    everything = torch.ones_like(W, dtype=torch.bool)
    qz = mixq.gptq(W, S, cfg, mask=everything)
    assert torch.equal(qz.dequantize(), W) and qz.n_kept() == W.numel()
    nothing = torch.zeros_like(W, dtype=torch.bool)
    assert torch.equal(mixq.gptq(W, S, cfg, mask=nothing).dequantize(),
                       mixq.gptq(W, S, cfg).dequantize())


@given(seed=st.integers(0, 10 ** 6), bits=st.integers(2, 8))
def test_signed_symmetric_grid_represents_the_largest_weight(seed, bits):
    # QuaRot's and ResQ's grid: s = max|w| / (2^(b-1) - 1), so the largest |w| is a grid point
    # (GPTQ's symmetric scale, 2 max / maxq, clips +max to (1 - 1/maxq) max)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed), dtype=DT)
    s, z = mixq.fit_grid(w, bits, sym=True, signed=True)
    half, amax = 2 ** (bits - 1), w.abs().amax(1, keepdim=True)
    assert (z == half).all()
    assert (s >= amax / (half - 1)).all() and (s <= amax / (half - 1) * (1 + 2 ** -10)).all()
    err = (mixq.fake_quant(w, s, z, 2 ** bits - 1) - w).abs()
    assert (err <= s / 2 * (1 + 1e-9)).all()
    top = w.abs().argmax(1, keepdim=True)  # within fp16's rounding of s
    assert (err.gather(1, top) <= amax * 2 ** -9).all()


def full_range(w, sym):
    """Each row's range before the search, as fit_grid sets it: 0 inside, a flat row widened."""
    xmin = w.min(1, keepdim=True).values.clamp(max=0)
    xmax = w.max(1, keepdim=True).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = xmax == xmin
    return torch.where(flat, xmin - 1, xmin), torch.where(flat, xmax + 1, xmax)


def mse_fit_loop(w, bits, sym):
    """fit_grid's MSE search written as the GPTQ repository's loop, one p at a time."""
    maxq = 2 ** bits - 1
    xmin, xmax = full_range(w, sym)
    s, z = mixq.scale_zero(xmin, xmax, maxq, sym)
    best = (mixq.fake_quant(w, s, z, maxq) - w).abs().pow(2.4).sum(1, keepdim=True)
    for i in range(1, 80):
        p = 1 - i / 100
        s1, z1 = mixq.scale_zero(p * xmin, p * xmax, maxq, sym)
        err = (mixq.fake_quant(w, s1, z1, maxq) - w).abs().pow(2.4).sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        s, z = torch.where(better, s1, s), torch.where(better, z1, z)
    return s, z


@given(seed=st.integers(0, 10 ** 6), m=st.integers(1, 9), k=st.integers(1, 40),
       bits=st.sampled_from([2, 3, 4]), sym=st.booleans(), chunk=st.sampled_from([1, 7, 80]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_mse_search_in_chunks_equals_the_loop(seed, m, k, bits, sym, chunk, dtype):
    # the batched search picks exactly the loop's grid: the first p with the smallest error per
    # row, across chunk boundaries too (chunk = ranges per batch: 1 (the CPU's), 7, all 80)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g, dtype=dtype)
    w[0] = 0.0  # ties: a zero row has error 0 at every p, and the loop keeps p = 1
    w[-1, : k // 2] = 0.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mixq, "MSE_CHUNK", {"cpu": chunk * m * k})
        s, z = mixq.fit_grid(w, bits, sym=sym, mse=True)
    s_ref, z_ref = mse_fit_loop(w, bits, sym)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)


@given(seed=st.integers(0, 10 ** 6))
def test_gptq_mask_kept_weights_and_grid(seed):
    W, S = random_problem(seed)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(W.shape, generator=g) < 0.1
    cfg = mixq.QuantConfig(wbits=3)
    qz = mixq.gptq(W, S, cfg, mask=mask)
    Wq = qz.dequantize()
    # unmasked entries are on the row grid, fitted ignoring the masked ones (min-max: the row
    # mean of the unmasked weights lies inside their range, so the fit equals theirs alone)
    s, z = mixq.fit_grid(mixq.fill_masked(W, mask), 3)
    assert torch.equal(qz.scales, s) and torch.equal(qz.zeros, z)
    on_grid = mixq.fake_quant(Wq, s, z, cfg.maxq)
    assert torch.equal(Wq[~mask], on_grid[~mask])
    # kept entries hold the error-updated values, not the originals (the first column's are
    # exact since nothing was spread onto it)
    assert torch.equal(Wq[:, 0][mask[:, 0]], W[:, 0][mask[:, 0]])
    assert not torch.equal(Wq[mask], W[mask])


def test_gptq_beats_rtn_on_correlated_inputs():
    wins = 0
    for seed in range(10):
        W, S = random_problem(seed, m=16, n=64)
        cfg = mixq.QuantConfig(wbits=3)
        wins += mixq.layer_loss(W, mixq.gptq(W, S, cfg).dequantize(), S) < \
            mixq.layer_loss(W, mixq.rtn(W, cfg).dequantize(), S)
    assert wins >= 9


def test_gptq_dead_columns_and_cholesky_retry(capsys):
    W, S = random_problem(3)
    S[5, :], S[:, 5] = 0, 0  # an input never active
    qz = mixq.gptq(W, S, mixq.QuantConfig(wbits=3))
    assert (qz.dequantize()[:, 5] == 0).all()
    singular = torch.ones(64, 64, dtype=DT)  # rank 1: needs more damping than 0
    mixq.gptq(W, singular, mixq.QuantConfig(wbits=3, percdamp=0.0))
    assert "Cholesky failed" in capsys.readouterr().out


# -- SpQR-style --------------------------------------------------------------------------------


@given(seed=st.integers(0, 10 ** 6))
def test_spqr_infinite_threshold_is_gptq(seed):
    W, S = random_problem(seed)
    cfg = mixq.QuantConfig(wbits=3, groupsize=16)
    assert torch.equal(mixq.gptq(W, S, cfg).dequantize(),
                       mixq.gptq(W, S, mixq.QuantConfig(wbits=3, groupsize=16,
                                                  outlier_threshold=math.inf)).dequantize())


@given(seed=st.integers(0, 10 ** 6))
def test_spqr_threshold_outliers(seed):
    W, S = random_problem(seed)
    cfg = mixq.spqr_config(mixq.QuantConfig(wbits=2))
    qz = mixq.gptq(W, S, cfg)
    assert 0 < qz.n_kept() < W.numel() // 2
    zero = mixq.gptq(W, S, mixq.spqr_config(mixq.QuantConfig(wbits=2, outlier_threshold=0.0)))
    assert torch.equal(zero.dequantize(), W)  # every weight with any error becomes an outlier
    # the statistics are quantized: 3-bit codes per 16 rows -> at most 8 values per 16 rows
    W64, S64 = random_problem(seed, m=64)
    scales = mixq.gptq(W64, S64, cfg).scales[:, 0]
    assert all(len(torch.unique(scales[r:r + 16])) <= 8 for r in range(0, 64, 16))
    assert len(torch.unique(scales)) > 8  # each block of rows has its own second-level grid


# -- QuantEase ---------------------------------------------------------------------------------


@given(cfg=configs, seed=st.integers(0, 10 ** 6), iters=st.integers(1, 8),
       relaxed=st.booleans())
def test_quantease_is_the_papers_coordinate_descent(cfg, seed, iters, relaxed):
    # quantease (blocked sums P, Phat, D) = the cyclic sweep written from f, one column at a time
    W, S = random_problem(seed, n=64)
    S[7, :], S[:, 7] = 0, 0  # a dead input
    cfg = mixq.QuantConfig(**{**vars(cfg), "iters": iters, "relaxed": relaxed, "blocksize": 16})
    torch.testing.assert_close(mixq.quantease(W, S, cfg).dequantize(),
                               mixq.quantease_paper(W, S, cfg), rtol=1e-9, atol=1e-9)


@given(cfg=configs, seed=st.integers(0, 10 ** 6), from_gptq=st.booleans())
def test_quantease_rounded_sweeps_never_increase_the_loss(cfg, seed, from_gptq):
    W, S = random_problem(seed)
    cfg = mixq.QuantConfig(**{**vars(cfg), "iters": 4, "relaxed": False})
    start = mixq.gptq(W, 2 * S, cfg) if from_gptq else None
    hist = []
    qz = mixq.quantease(W, S, cfg, start=start, history=hist)
    losses = [f for _, f in hist]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:]))
    if from_gptq:  # never worse than its GPTQ start
        assert qz.loss <= mixq.layer_loss(W, start.dequantize(), S) * (1 + 1e-12)


@given(cfg=configs, seed=st.integers(0, 10 ** 6))
def test_quantease_diagonal_sigma_is_rtn(cfg, seed):
    W, _ = random_problem(seed)
    d = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(seed), dtype=DT) + 0.1
    cfg = mixq.QuantConfig(**{**vars(cfg), "iters": 1})
    assert torch.equal(mixq.quantease(W, torch.diag(d), cfg).dequantize(),
                       mixq.rtn(W, cfg).dequantize())


@given(seed=st.integers(0, 10 ** 6))
def test_quantease_fixed_point(seed):
    W, S = random_problem(seed)
    one = mixq.QuantConfig(wbits=3, iters=1)
    qz = mixq.quantease(W, S, one)
    for _ in range(100):  # sweep until the codes stop changing: a coordinate-wise minimum
        nxt = mixq.quantease(W, S, one, start=qz)
        assert nxt.loss <= qz.loss * (1 + 1e-12)
        if torch.equal(nxt.codes, qz.codes):
            break
        qz = nxt
    else:
        pytest.fail("no fixed point in 100 sweeps")
    again = mixq.quantease(W, S, one, start=nxt)  # a sweep started there returns it unchanged
    assert torch.equal(again.dequantize(), nxt.dequantize())


@given(seed=st.integers(0, 10 ** 6), relaxed=st.booleans(),
       groupsize=st.sampled_from([-1, 16]))
def test_quantease_act_order_is_the_permuted_problem(seed, relaxed, groupsize):
    # sweeping by decreasing Sigma_jj = QuantEase on W and Sigma with their columns permuted
    # that way, permuted back; each group is g consecutive columns of that order (the released
    # code's act-order)
    W, S = random_problem(seed)
    cfg = mixq.QuantConfig(wbits=3, iters=4, relaxed=relaxed, groupsize=groupsize)
    perm = torch.argsort(torch.diag(S), descending=True)
    ordered = mixq.quantease(W, S, mixq.QuantConfig(**{**vars(cfg), "act_order": True}))
    permuted = mixq.quantease(W[:, perm], S[perm][:, perm], cfg)
    torch.testing.assert_close(ordered.dequantize()[:, perm], permuted.dequantize())
    assert torch.equal(ordered.codes[:, perm], permuted.codes)
    assert ordered.loss == pytest.approx(permuted.loss, rel=1e-9)
    if groupsize != -1:  # the grid of column perm[i] is grid i // g
        assert torch.equal(ordered.col_group[perm], torch.arange(64) // groupsize)
    with pytest.raises(ValueError, match="column order"):
        mixq.quantease_outliers(W, S, mixq.QuantConfig(wbits=3, outliers=0.01, act_order=True))


@given(seed=st.integers(0, 10 ** 6))
def test_quantease_act_order_with_static_groups_keeps_contiguous_groups(seed):
    W, S = random_problem(seed)
    cfg = mixq.QuantConfig(wbits=3, iters=3, groupsize=16, act_order=True, static_groups=True)
    qz = mixq.quantease(W, S, cfg)
    s, z, _ = mixq.fit_groups(W, cfg)  # one grid per 16 contiguous columns of W
    assert qz.col_group is None and torch.equal(qz.scales, s) and torch.equal(qz.zeros, z)


@given(seed=st.integers(0, 10 ** 6), n=st.sampled_from([8, 64, 300]),
       decay=st.floats(0.0, 3.0))
def test_power_iteration_finds_lambda_max(seed, n, decay):
    # Sigma = X^T X / N with column scales decaying as j^-decay: from isotropic (a small gap
    # between the two largest eigenvalues) to one dominant direction
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * n, n, generator=g, dtype=DT) * torch.arange(1, n + 1, dtype=DT) ** -decay
    S = X.T @ X / (2 * n)
    lam = mixq.largest_eigenvalue(S)
    exact = torch.linalg.eigvalsh(S)[-1].item()
    assert lam <= exact * (1 + 1e-12)  # a Rayleigh quotient: never above
    assert lam == pytest.approx(exact, rel=1e-3)


def test_quantease_relaxed_sweeps_are_unrounded_but_the_last_rounds():
    W, S = random_problem(0)
    hist = []
    mixq.quantease(W, S, mixq.QuantConfig(wbits=3, iters=6, relaxed=True), history=hist)
    assert [r for r, _ in hist] == [True, False, True, True, False, True]
    # an unrounded sweep is exact coordinate descent on a convex quadratic: it never raises f,
    # and it leaves the grid, so it lands strictly below the rounded sweep before it
    for (_, before), (rounded, after) in zip(hist, hist[1:]):
        if not rounded:
            assert after < before
    hist = []
    mixq.quantease(W, S, mixq.QuantConfig(wbits=3, iters=2, relaxed=True), history=hist)
    assert [r for r, _ in hist] == [True, True]  # the last sweep always rounds


@given(seed=st.integers(0, 10 ** 6), frac=st.sampled_from([0.01, 0.05, 0.2]))
def test_quantease_outliers_budget_monotone_and_helpful(seed, frac):
    W, S = random_problem(seed, m=16)
    cfg = mixq.QuantConfig(wbits=2, iters=4, outliers=frac, relaxed=False)
    hist = []
    qz = mixq.quantease_outliers(W, S, cfg, history=hist)
    assert qz.n_kept() <= round(frac * W.numel())
    losses = [f for _, f in hist]  # every (rounded) CD sweep and every IHT step
    assert all(b <= a * (1 + 1e-9) for a, b in zip(losses, losses[1:]))
    plain = mixq.quantease(W, S, mixq.QuantConfig(wbits=2, iters=4, relaxed=False))
    assert qz.loss < plain.loss  # the 16-bit weights buy a lower loss


def test_quantease_outliers_follow_the_released_schedule():
    W, S = random_problem(0, m=16)
    hist = []
    mixq.quantease_outliers(W, S, mixq.QuantConfig(wbits=2, iters=6, outliers=0.05),
                            history=hist)
    assert [kind for kind, _ in hist[::2]] == ["cd", "cd-unrounded", "cd", "cd", "cd-unrounded",
                                               "cd"]  # QuantEase's relaxed sweeps, the last rounds


@given(seed=st.integers(0, 10 ** 6), iters=st.sampled_from([1, 2]))
def test_quantease_outliers_iht_step_is_the_released_one(seed, iters):
    # the sweeps, then Hs <- TopK(Hs - (W_hat + Hs - W) Sigma / (2 lambda_max)) after each, by hand
    W, S = random_problem(seed, m=16)
    cfg = mixq.QuantConfig(wbits=2, iters=iters, outliers=0.05, relaxed=False)
    k = round(0.05 * W.numel())
    Hs = W * mixq.top_k_mask(W, k)
    s, z, g = mixq.fit_groups(W, cfg, mask=Hs != 0)
    se, ze = mixq.per_column(s, g, W.shape[1]), mixq.per_column(z, g, W.shape[1])
    S_off, lam = mixq.normalized_offdiag(S), mixq.largest_eigenvalue(S)
    What = W - Hs
    for _ in range(iters):
        T = W - Hs
        What = mixq.cd_sweep(What, T + T @ S_off, S_off, se, ze, cfg.maxq)
        Hs = Hs - (What + Hs - W) @ S / (2 * lam)
        Hs = Hs * mixq.top_k_mask(Hs, k)
    qz = mixq.quantease_outliers(W, S, cfg)
    assert torch.equal(qz.kept, Hs != 0)
    kept = torch.where(Hs != 0, (What + Hs - What).half().to(DT), 0)  # stored in fp16
    torch.testing.assert_close(qz.dequantize(), What + kept, rtol=1e-12, atol=1e-12)


def test_quantease_all_outliers_is_exact():
    W, S = random_problem(2)
    qz = mixq.quantease_outliers(W, S, mixq.QuantConfig(wbits=2, iters=3, outliers=1.0))
    assert torch.equal(qz.dequantize(), W) and qz.loss == 0


# -- bit count and packing -----------------------------------------------------------------------


def test_bit_count_by_hand():
    m, n = 8, 64
    codes = torch.zeros(m, n, dtype=DT)
    qz = mixq.Quantized(codes, torch.ones(m, 2), torch.zeros(m, 2), 3, 32)
    assert mixq.stored_bits(qz) == 8 * 64 * 3 + 8 * 2 * 2 * 16  # codes + scale and zero per group
    qz.kept = torch.zeros(m, n, dtype=torch.bool)
    qz.kept[0, :5] = True
    assert mixq.stored_bits(qz) == 8 * 64 * 3 + 8 * 2 * 2 * 16 + 5 * 32  # + value and index
    qz = mixq.rtn(torch.randn(8, 72), mixq.QuantConfig(wbits=3, groupsize=32))  # 32 + 32 + 8
    assert mixq.stored_bits(qz) == 8 * 72 * 3 + 8 * 3 * 2 * 16
    # SpQR's README configuration: w3, groups of 16, 3-bit statistics in groups of 16 -> 3.625
    cfg = mixq.spqr_config(mixq.QuantConfig(wbits=3))
    qz = mixq.Quantized(torch.zeros(16, 64), torch.ones(16, 4), torch.zeros(16, 4), 3, 16,
                     stat_bits=mixq.bits_per_statistic(cfg))
    assert mixq.stored_bits(qz) / (16 * 64) == 3.625
    r = {"a": {"bits_stored": 300, "numel": 100}, "b": {"bits_stored": 500, "numel": 100}}
    assert mixq.average_bits(r) == 4.0


@given(bits=st.sampled_from([1, 2, 3, 4, 8]), words=st.integers(1, 4), N=st.integers(1, 9),
       seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(bits, words, N, seed):
    K = 32 * words
    codes = torch.randint(0, 2 ** bits, (K, N), generator=torch.Generator().manual_seed(seed))
    t = kernels.pack_codes(codes, bits)
    assert t["qweight"].dtype == torch.int32
    assert torch.equal(kernels.unpack_codes(t, bits, K).long(), codes)


@given(words=st.integers(1, 3), N=st.integers(1, 5), seed=st.integers(0, 1000))
def test_3_bit_high_plane_puts_each_high_bit_above_its_low_bits(words, N, seed):
    # what the kernels rely on (kernels.py, the format): with lo = word 2r + w of the low plane
    # and hi = word r of the high one shifted up by 2w, (lo & 0x33333333) | (hi & 0xCCCCCCCC)
    # holds code 32r + 16w + 2j in nibble j, and the same with lo >> 2, hi >> 1 code 2j + 1
    K = 32 * words
    codes = torch.randint(0, 8, (K, N), generator=torch.Generator().manual_seed(seed))
    t = kernels.pack_codes(codes, 3)
    lo, hi = t["qweight"].long() & 0xFFFFFFFF, t["qweight_hi"].long() & 0xFFFFFFFF
    for r in range(words):
        for w in range(2):
            h = (hi[r] << 2 * w) & 0xFFFFFFFF
            even = (lo[2 * r + w] & 0x33333333) | (h & 0xCCCCCCCC)
            odd = ((lo[2 * r + w] >> 2) & 0x33333333) | ((h >> 1) & 0xCCCCCCCC)
            for j in range(8):
                k = 32 * r + 16 * w + 2 * j
                assert torch.equal((even >> 4 * j) & 7, codes[k])
                assert torch.equal((odd >> 4 * j) & 7, codes[k + 1])


@given(seed=st.integers(0, 10 ** 6), cfg=configs.filter(lambda c: c.wbits in mixq.PACKED_BITS))
def test_packed_form_dequantizes_to_the_same_weights(seed, cfg):
    W, S = random_problem(seed, n=64)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed)) < 0.05
    qz = mixq.gptq(W.float(), S.float(), cfg, mask=mask)
    t = mixq.packed_tensors(qz)
    back = kernels.dequantize(t, cfg.wbits, qz.groupsize, *W.shape)
    assert torch.equal(back, qz.dequantize())


def test_solvers_give_the_same_codes_on_one_thread_or_several():
    # the pipeline solves on one thread (mixq.solve_group); the result must not depend on it
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 256, generator=g)
    X = torch.randn(512, 256, generator=g) * torch.rand(256, generator=g)
    S = X.T @ X / 512
    cfg = mixq.QuantConfig(wbits=3, groupsize=64, mse=True, iters=4)
    before = torch.get_num_threads()
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append((mixq.gptq(W, 2 * S, cfg).codes, mixq.quantease(W, S, cfg).codes))
    torch.set_num_threads(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_a_group_solved_side_by_side_is_the_group_solved_in_turn():
    # the pipeline's seam: linears that share an input on worker threads, each solve on one
    # torch thread; the results are those of solving them one after another, in their order
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g) * torch.rand(64, generator=g)
    S = X.T @ X / 512
    cfg = mixq.QuantConfig(wbits=3, groupsize=32, mse=True)
    problems = [(method, torch.randn(rows, 64, generator=g), S, cfg, None, None)
                for method, rows in (("gptq", 48), ("quantease", 16), ("rtn", 32))]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = mixq.solve_group(problems, "cpu")
        assert torch.get_num_threads() == 2
        with mixq.one_thread():
            in_turn = [mixq.solve(*p) for p in problems]
    finally:
        torch.set_num_threads(before)
    for (qz, seconds), ref in zip(together, in_turn):
        assert seconds > 0 and torch.equal(qz.codes, ref.codes)
        assert torch.equal(qz.scales, ref.scales) and torch.equal(qz.zeros, ref.zeros)


def test_one_thread_restores_the_thread_count_on_errors():
    before = torch.get_num_threads()
    with pytest.raises(KeyError):
        with mixq.one_thread():
            assert torch.get_num_threads() == 1
            raise KeyError("inside")
    assert torch.get_num_threads() == before
