"""Activation checkpointing: the same gradients as keeping everything (dropout included, with
tensor and sequence parallelism), and a measured drop in peak memory."""

from __future__ import annotations

import pytest
import torch

from nanomt.model import GPT, ModelConfig
from nanomt.model.checkpointing import set_activation_checkpointing
from nanomt.testing import run_distributed

MODES = ("none", "selective", "full")


def gradients_and_peak(model_cfg: ModelConfig, grid, mode: str, tokens: torch.Tensor,
                       sequence_parallel: bool = False) -> dict:
    from nanomt.memory import PeakMemoryMeter

    model = GPT(model_cfg, grid, seed=7, sequence_parallel=sequence_parallel)
    set_activation_checkpointing(model, mode)
    torch.manual_seed(11)  # the same dropout stream for every mode
    with PeakMemoryMeter() as meter:
        loss = model(tokens, tokens)
        loss.backward()
    return {"loss": loss.detach(), "peak": meter.peak_bytes,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "rng_after": (torch.get_rng_state(), model.rng.state_dict())}


@pytest.fixture(scope="module")
def single_process() -> dict:
    # Big enough for activations to dominate: 4 layers, s=128, h=64, batch 4.
    model_cfg = ModelConfig(num_layers=4, hidden_size=64, num_heads=4, seq_len=128, dropout=0.1)
    tokens = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    return {mode: gradients_and_peak(model_cfg, None, mode, tokens) for mode in MODES}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_same_gradients_with_dropout(single_process, mode):
    base, other = single_process["none"], single_process[mode]
    assert torch.equal(base["loss"], other["loss"])
    for name, grad in base["grads"].items():
        assert torch.equal(grad, other["grads"][name]), name
    # Recomputation replays the forward's random draws without consuming new ones.
    assert torch.equal(base["rng_after"][0], other["rng_after"][0])


def test_peak_memory_drops(single_process):
    peak = {mode: single_process[mode]["peak"] for mode in MODES}
    assert peak["full"] < peak["selective"] < peak["none"], peak
    assert peak["full"] < 0.6 * peak["none"], peak


def _tensor_parallel_checks() -> dict:
    from nanomt.parallel.grid import ParallelGrid

    grid = ParallelGrid(2, 1, 1)
    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=16, dropout=0.2)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for sp in (False, True):
        for mode in MODES:
            result = gradients_and_peak(model_cfg, grid, mode, tokens, sequence_parallel=sp)
            out[(sp, mode)] = {k: result[k] for k in ("loss", "grads", "rng_after")}
    return out


def test_same_gradients_under_tensor_and_sequence_parallelism():
    for rank_result in run_distributed(_tensor_parallel_checks, world_size=2, timeout_s=400):
        for sp in (False, True):
            base = rank_result[(sp, "none")]
            for mode in ("selective", "full"):
                other = rank_result[(sp, mode)]
                assert torch.equal(base["loss"], other["loss"])
                for name, grad in base["grads"].items():
                    assert torch.equal(grad, other["grads"][name]), (sp, mode, name)
                # The tensor-parallel tracker ends where it would without recomputation.
                tracker, other_tracker = base["rng_after"][1], other["rng_after"][1]
                assert all(torch.equal(tracker[k], other_tracker[k]) for k in tracker)


def test_bad_mode_names_the_key():
    model = GPT(ModelConfig(num_layers=1, hidden_size=32, num_heads=4, seq_len=16))
    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        set_activation_checkpointing(model, "sometimes")
