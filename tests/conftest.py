"""Shared test setup: a tiny model config. Nothing here reaches outside the checkout: GPT-2 BPE
comes from assets/r50k_base.tiktoken (dataloader.gpt2_encoding)."""

import pytest


@pytest.fixture
def tiny_config():
    from model import GPTConfig
    return GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0)
