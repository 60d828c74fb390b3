"""Shared fixtures: tiny random Llamas (via transformers, the oracle) and the embedded model."""

import os
import sys
from pathlib import Path

# Triton kernels run on the CPU interpreter in tests (set before triton is first imported);
# MIXQ_TEST_GPU=1 runs them on a GPU instead
if not os.environ.get("MIXQ_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat top-level modules

# few examples, no deadline: the suite must stay well under 15 minutes on 2 cores
settings.register_profile("mixq", max_examples=int(os.environ.get("MIXQ_EXAMPLES", "15")),
                          deadline=None, derandomize=True)
settings.load_profile("mixq")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_hf_config(**over):
    """A small GQA Llama config: 4 query heads, 2 KV heads, 2 layers."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2)
    cfg.update(over)
    return transformers.LlamaConfig(**cfg)


def tiny_hf_model(seed=0, **over):
    """A transformers LlamaForCausalLM with random weights (fp32, eval mode)."""
    import transformers
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(tiny_hf_config(**over)).eval()
    # random norms, so a mix-up of the two norms or a missing norm weight shows in the logits
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A tiny random HF checkpoint directory and its transformers model."""
    hf = tiny_hf_model()
    d = tmp_path / "tiny"
    hf.save_pretrained(d)
    return d, hf


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct through model.py (fp32, CPU)."""
    import model as M
    return M.load()
