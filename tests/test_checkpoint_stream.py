"""Saves stream: the file is valid safetensors holding exactly the live tensors, and a save holds
no copy of the optimizer state (device or host) nor the serialized file, only one staging
buffer no larger than the largest tensor (below one gradient bucket)."""

from __future__ import annotations

import tracemalloc

import torch
from safetensors.torch import load_file

from nanomt.checkpoint import save_checkpoint
from nanomt.checkpoint.stream import write_safetensors
from nanomt.memory import PeakMemoryMeter
from nanomt.model import GPT, ModelConfig
from nanomt.optim import build_optimizer
from nanomt.parallel.param_info import param_info
from nanomt.testing import compose_config


def test_streamed_file_is_safetensors_with_the_same_tensors(tmp_path):
    tensors = [("a/f32", torch.randn(3, 5)), ("b/bf16", torch.randn(7).to(torch.bfloat16)),
               ("c/i64", torch.arange(4)), ("d/view", torch.randn(10, 4)[2:5]),
               ("e/empty", torch.zeros(0, 3))]
    size, _ = write_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"},
                                staging_bytes=8)  # many slices per tensor
    loaded = load_file(tmp_path / "x.safetensors")
    assert size == (tmp_path / "x.safetensors").stat().st_size
    assert set(loaded) == {key for key, _ in tensors}
    for key, tensor in tensors:
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def test_save_holds_one_staging_buffer_not_a_copy_of_the_state(tmp_path):
    model_cfg = ModelConfig(num_layers=2, hidden_size=128, num_heads=4, seq_len=16)
    cfg = compose_config(["train.precision=bf16", "parallel.bucket_size_mb=0.5"])
    model = GPT(model_cfg, None, seed=1)
    optimizer = build_optimizer([model], cfg, None, num_microbatches=1)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(tokens, tokens).backward()
    optimizer.step()
    state_bytes = optimizer.memory()["optimizer_state"]  # fp32 masters and two moments
    largest = max(p.numel() for p in model.parameters()) * 4  # the largest fp32 piece
    bucket = int(0.5 * 2**20)
    meta = {"model": model_cfg.to_dict()}
    with PeakMemoryMeter():  # first-use costs outside the measurement (lazy imports)
        save_checkpoint(tmp_path, 0, [model], optimizer, None, meta)
    tracemalloc.start()
    try:
        with PeakMemoryMeter() as meter:
            save_checkpoint(tmp_path, 1, [model], optimizer, None, meta)
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 < meter.peak_bytes <= largest <= bucket and largest < state_bytes / 8
    assert python_peak < state_bytes / 8  # neither the serialized file nor host tensors
    stored = load_file(tmp_path / "step_00000001" / "rank_00000.safetensors")
    for param, state_name, value, _ in optimizer.checkpoint_state():  # stage 0: whole params
        key = f"optimizer/{state_name}/{param_info(param).name}"
        assert torch.equal(stored[key].reshape(-1), value), key
