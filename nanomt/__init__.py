"""nanomt: 3D-parallel GPT training (tensor x pipeline x data parallelism, ZeRO) in plain PyTorch."""

__version__ = "0.1.0"
