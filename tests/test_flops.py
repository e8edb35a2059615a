"""The FLOPs counter against the MT-NLG paper's own numbers (REFERENCE.md)."""

import pytest

from nanomt.flops import flops_per_iteration, model_flops_utilization
from nanomt.model import ModelConfig

MTNLG = ModelConfig(num_layers=105, hidden_size=20480, num_heads=128, seq_len=2048,
                    vocab_size=50257)


def test_mtnlg_iteration_flops_and_throughput():
    # about 16,926 PFLOP per iteration of 1920 sequences (with V padded to 51200)
    flops = flops_per_iteration(MTNLG, 1920, padded_vocab=51200, full_recompute=True)
    assert flops / 1e15 == pytest.approx(16926, rel=0.01)
    # 60.1 s on 280 DGX nodes (2240 GPUs) = about 126 TFLOP/s per GPU
    assert flops / 60.1 / 2240 / 1e12 == pytest.approx(126, rel=0.01)


def test_model_flops_are_three_quarters_of_recompute_flops_for_large_h():
    cfg = ModelConfig(num_layers=100, hidden_size=16384, num_heads=128, seq_len=2048,
                      vocab_size=8)
    ratio = flops_per_iteration(cfg, 8) / flops_per_iteration(cfg, 8, full_recompute=True)
    assert ratio == pytest.approx(0.75, rel=0.001)


def test_mfu_is_achieved_over_peak():
    f = flops_per_iteration(MTNLG, 1920)
    assert model_flops_utilization(MTNLG, 1920, 10.0, 100, f / 10.0 / 100) == pytest.approx(1.0)
