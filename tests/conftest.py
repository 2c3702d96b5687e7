"""Session-wide fixtures: tiny real VLMs built once per test session (see vlmprune/testbed/tiny.py)."""

from __future__ import annotations

import pytest
import torch

from vlmprune.testbed.tiny import build_llava, build_llava_next

# The test models are tiny: intra-op threads cost more than they save, and on a shared 2-core
# machine OpenMP's spin-waiting threads slow every forward by 100x when another process holds a core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llava(tmp_path_factory):
    """(model, processor) of a tiny LLaVA-1.5."""
    return build_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="session")
def llava_next(tmp_path_factory):
    """(model, processor) of a tiny LLaVA-NeXT (AnyRes, newline tokens)."""
    return build_llava_next(tmp_path_factory.mktemp("llava_next"))


@pytest.fixture(scope="session")
def qwen2_vl(tmp_path_factory):
    """(model, processor) of a tiny Qwen2-VL (packed ViT, 2x2 merger, M-RoPE)."""
    from vlmprune.testbed.tiny import build_qwen2_vl

    return build_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))


@pytest.fixture(scope="session")
def qwen2_5_vl(tmp_path_factory):
    """(model, processor) of a tiny Qwen2.5-VL (window attention, fullatt_block_indexes=[1])."""
    from vlmprune.testbed.tiny import build_qwen2_5_vl

    return build_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))
