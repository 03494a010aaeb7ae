"""Shared fixtures: tiny seeded decoder models built from transformers configs, and the real SmolLM2.

Tiny models are built fresh per request (tests may replace their modules); ``smollm2`` is loaded once
per session and must not be modified in place (``copy.deepcopy`` it first).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
TINY_VOCAB = 256

_TINY_SHAPE = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def make_tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-block fp32 causal LM of ``family`` with seeded random weights, in eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[family]
    config = config_cls(**{**_TINY_SHAPE, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def make_tiny_ids(n_seq: int = 5, seq_len: int = 37, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VOCAB, (n_seq, seq_len), generator=g)


@pytest.fixture
def tiny_model_factory():
    """``factory(family="llama", seed=0, **config_overrides)`` -> fresh tiny model."""
    return make_tiny_model


@pytest.fixture(params=TINY_FAMILIES)
def tiny_model(request):
    """A fresh tiny model for each supported family."""
    return make_tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture
def tiny_ids():
    """(5, 37) seeded random token ids for the tiny models."""
    return make_tiny_ids()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (LoadedModel), converted once into the rocketkit cache. Read-only."""
    from rocketkit.models import load_model

    return load_model("smollm2")
