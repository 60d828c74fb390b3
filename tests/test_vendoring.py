"""Each of the four files copied alone into an empty directory, its core used there with torch
only (the README's "Each file stands alone"). Every check runs in a fresh process whose import
path holds that directory and the installed packages, not the project."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

USES = {
    "kernels.py": """
        import torch, kernels
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (64, 24), generator=g)  # (K, N) 4-bit weight codes
        a = torch.randint(-128, 128, (5, 64), generator=g, dtype=torch.int8)
        P = kernels.int_matmul_reference(a, kernels.pack(codes, 4), 4)
        assert torch.equal(P.long(), a.long() @ (codes - 8))
        t = kernels.pack_codes(codes, 4) | {"scales": torch.ones(1, 24).half(),
                                               "zeros": torch.full((1, 24), 8.0).half()}
        W = kernels.dequantize(t, 4, 64, 24, 64)  # (N, K)
        assert torch.equal(W, (codes.T - 8).float())
    """,
    "model.py": """
        import torch, model
        args = model.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                               hidden_dim=96, vocab_size=100)
        torch.manual_seed(0)
        m = model.Transformer(args)
        x = torch.randint(0, 100, (2, 9))
        logits = m(x)
        assert logits.shape == (2, 9, 100) and torch.isfinite(logits).all()
        assert len(m.generate([1, 2, 3], 4, stop_ids=[])) == 4
        try:  # a quantized checkpoint would need kernels.py: said so, not blamed on transformers
            model.import_kernels()
            raise AssertionError("kernels.py is not here")
        except ImportError as e:
            assert "kernels.py" in str(e) and "transformers imports" not in str(e), e
    """,
    "eval.py": """
        import math, torch
        import eval as metrics

        class Uniform(torch.nn.Module):  # the same logits everywhere: ppl = vocab size
            device = torch.device("cpu")
            def forward(self, x):
                return torch.zeros(*x.shape, 50)

        r = metrics.perplexity(Uniform(), torch.randint(0, 50, (100,)), seqlen=32)
        assert r["windows"] == 3 and math.isclose(r["ppl"], 50, rel_tol=1e-5), r
    """,
    "mixq.py": """
        import torch
        from mixq import QuantConfig, rtn, gptq, quantease, stored_bits
        g = torch.Generator().manual_seed(0)
        W = torch.randn(16, 64, generator=g)
        X = torch.randn(256, 64, generator=g)
        Sigma = X.T @ X / 256  # Sigma = X X^T / n (X as rows here), H = 2 Sigma
        H = 2 * Sigma
        cfg = QuantConfig(wbits=3, groupsize=32)
        err = {}
        for name, f in (("rtn", lambda: rtn(W, cfg)), ("gptq", lambda: gptq(W, H, cfg)),
                        ("quantease", lambda: quantease(W, Sigma, cfg))):
            q = f()
            assert q.codes.min() >= 0 and q.codes.max() <= 7 and stored_bits(q) > 0
            err[name] = float(torch.trace((W - q.dequantize()) @ H @ (W - q.dequantize()).T))
        assert err["gptq"] < err["rtn"] and err["quantease"] < err["rtn"], err
        import mixq
        try:  # the pipeline needs model.py: a clear error, not a NameError
            mixq.llama.load()
            raise AssertionError("model.py is not here")
        except ImportError as e:
            assert "model" in str(e), e
    """,
}


@pytest.mark.parametrize("name", list(USES))
def test_each_file_works_copied_alone(tmp_path, name):
    shutil.copy(ROOT / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(USES[name])], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
