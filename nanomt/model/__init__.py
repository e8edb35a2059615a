"""The GPT model: plain PyTorch built from tensor-parallel layers."""

from nanomt.model.config import ModelConfig
from nanomt.model.gpt import GPT

__all__ = ["GPT", "ModelConfig"]
