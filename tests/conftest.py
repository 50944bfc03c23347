import pytest
import torch

from elasticmoe.config import ModelConfig

torch.set_num_threads(1)


@pytest.fixture
def tiny_config() -> ModelConfig:
    """A model small enough for sub-second tests, with every elastic dimension > 1."""
    return ModelConfig(
        vocab_size=97,
        d_model=32,
        layers=3,
        heads=4,
        kv_heads=2,
        head_dim=8,
        experts=4,
        top_k=2,
        expert_width=24,
        max_seq_len=64,
    )
