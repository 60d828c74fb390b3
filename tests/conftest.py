"""Shared fixtures: tiny random Llamas (made by transformers, the oracle) and the embedded model."""

import json
import os
import shutil
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
from oracle import Oracle  # noqa: E402

# few examples, no deadline: the suite must stay well under 15 minutes on 2 cores
settings.register_profile("mixq", max_examples=int(os.environ.get("MIXQ_EXAMPLES", "15")),
                          deadline=None, derandomize=True)
settings.load_profile("mixq")
torch.set_num_threads(min(2, torch.get_num_threads()))


ORACLE = Oracle()  # transformers, in a process of its own (tests/oracle.py says why)
_made = {}  # (seed, config) -> a checkpoint the oracle saved once this session


def tiny_checkpoint(path, seed=0, **config):
    """A tiny random Llama checkpoint (oracle.TINY_CONFIG updated by config) as transformers
    saves it, copied to path, which must not exist. Returns path."""
    key = json.dumps([seed, config], sort_keys=True)
    if key not in _made:
        _made[key] = ORACLE.save_tiny(ORACLE.tmp / f"tiny{len(_made)}", seed, **config)
    shutil.copytree(_made[key], path)
    return Path(path)


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A tiny random checkpoint directory, fresh for each test."""
    return tiny_checkpoint(tmp_path / "tiny")


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct through model.py (fp32, CPU)."""
    import model as llama
    return llama.load()
