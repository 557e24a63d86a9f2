"""Shared test setup: offline GPT-2 BPE ranks and a tiny model config."""

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_RANKS = ROOT.parent / "shared" / "tokenizers" / "r50k_base.tiktoken"
RANKS_SHA1_NAME = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"  # tiktoken's cache key for r50k_base


def pytest_configure(config):
    # tiktoken reads its cache before it tries the network: tests never download
    cache = Path(os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT / ".cache" / "tiktoken")))
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / RANKS_SHA1_NAME).exists() and SHARED_RANKS.exists():
        shutil.copy(SHARED_RANKS, cache / RANKS_SHA1_NAME)


@pytest.fixture
def tiny_config():
    from model import GPTConfig
    return GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0)
