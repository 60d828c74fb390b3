"""GPTQModel, the field's GPTQ tool, and mixq both ways, on the embedded model: mixq's GPTQ
exports run in GPTQModel.load and in transformers (GPTQModel's torch kernel), and a model that
GPTQModel quantized runs in mixq. GPTQModel imports transformers, so it runs in the oracle's
process (tests/oracle.py).

Tolerance: GPTQModel's CPU kernels take fp16 and bf16 only, so its fp16 logits are compared
with mixq's fp32 logits of the same checkpoint. They must lie within twice the distance that
fp16 itself puts between mixq's fp16 and fp32 logits (relative L2 norm; about 3e-3 here), and
agree on the top token at 90% of the positions or more."""

import importlib.util

import pytest
import torch

import eval as metrics
import mixq
import model as llama
from conftest import ORACLE

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None,
    reason="GPTQModel is not installed (.ci/run installs it: setuptools>=84.2.1 first, then "
           "pip install gptqmodel optimum; see docs/usage.md)")


def relative(a, b) -> float:
    return float((a.float() - b).norm() / b.norm())


def check_close(ckpt, theirs, ids):
    """theirs (fp16 logits of ckpt from another tool) against mixq's fp32 logits of ckpt."""
    ours, _ = llama.load(str(ckpt))
    ours16, _ = llama.load(str(ckpt), dtype="fp16")
    assert isinstance(ours.layers[0].self_attn.q_proj, llama.import_kernels().QuantLinear)
    ref = ours(ids)
    fp16_gap = relative(ours16(ids), ref)
    assert relative(theirs, ref) <= 2 * fp16_gap, (relative(theirs, ref), fp16_gap)
    agree = (theirs.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree


@pytest.fixture(scope="module")
def ids():
    _, tok = llama.load()
    text = metrics.corpus_text("pydoc", "eval")[:400]
    return torch.tensor([tok.encode(text)[:64]])


@pytest.mark.parametrize("name,method,cfg,fmt", [
    ("W4 g64 sym", "rtn", mixq.QuantConfig(wbits=4, groupsize=64, sym=True), "gptq"),
    ("W3 g64", "rtn", mixq.QuantConfig(wbits=3, groupsize=64), "gptq_v2"),
    ("W4 g64 act-order static", "gptq",
     mixq.QuantConfig(wbits=4, groupsize=64, act_order=True, static_groups=True), "gptq_v2"),
    ("W4 g128 (partial groups)", "rtn", mixq.QuantConfig(wbits=4, groupsize=128), "gptq_v2")])
def test_mixqs_gptq_exports_run_in_gptqmodel_and_transformers(name, method, cfg, fmt, ids,
                                                              tmp_path):
    out = tmp_path / "gptq"
    mixq.run(method=method, cfg=cfg, nsamples=4, seqlen=128, evals=[],
             save=str(tmp_path / "q"), export=(fmt, str(out)))
    for loader in ("gptqmodel", "transformers"):
        check_close(out, ORACLE.gptq_forward(out, ids, loader), ids)


def test_a_model_gptqmodel_quantized_runs_in_mixq(ids, tmp_path):
    # the embedded model as an HF directory, quantized by GPTQModel itself: asymmetric 4-bit
    # groups of 128 (partial on the 576 inputs), v1 zero points, written by GPTQModel's packer
    model, tok = llama.load()
    src = tmp_path / "fp"
    llama.save_hf(model, None, src)
    mixq.write_side_files(llama.embedded_checkpoint(), tok, src)
    text = metrics.corpus_text("pydoc", "calib")
    texts = [text[i * 2000:(i + 1) * 2000] for i in range(8)]
    out = ORACLE.gptqmodel_quantize(src, tmp_path / "gq", texts, bits=4, group_size=128,
                                    sym=False)
    check_close(out, ORACLE.gptq_forward(out, ids, "gptqmodel"), ids)
