"""The FLOPs counter against the MT-NLG paper's own numbers (REFERENCE.md) and hand counts.

Expanded, the two formulas are sums of GEMM terms one can count by hand (per iteration):

    full recompute  96 B s l h^2 (1 + s/(6h) + V/(16 l h)) = 96 B s l h^2 + 16 B s^2 l h + 6 B s h V
    model FLOPs     72 B s l h^2 (1 + s/(6h) + V/(12 l h)) = 72 B s l h^2 + 12 B s^2 l h + 6 B s h V

The logit GEMM (6 B s h V: forward 2, backward 4) is the same in both: it is not recomputed.
"""

import pytest

from nanomt.flops import flops_per_iteration
from nanomt.metrics import throughput
from nanomt.model import ModelConfig

MTNLG = ModelConfig(num_layers=105, hidden_size=20480, num_heads=128, seq_len=2048,
                    vocab_size=50257)


def expanded(B: int, s: int, l: int, h: int, V: int, full_recompute: bool) -> int:
    """The GEMM terms of the module docstring, in integers."""
    if full_recompute:
        return 96 * B * s * l * h * h + 16 * B * s * s * l * h + 6 * B * s * h * V
    return 72 * B * s * l * h * h + 12 * B * s * s * l * h + 6 * B * s * h * V


def test_mtnlg_iteration_flops_and_throughput():
    # 1920 sequences of 2048 tokens, V padded to 51200: 16,926.4 PFLOP per iteration. Without
    # the vocabulary term V/(16 l h) it would be 16,901.7, 0.15% less: rel=1e-4 sees the term.
    flops = flops_per_iteration(MTNLG, 1920, padded_vocab=51200, full_recompute=True)
    assert flops / 1e15 == pytest.approx(16926.43, rel=1e-4)
    assert flops == pytest.approx(expanded(1920, 2048, 105, 20480, 51200, True), rel=1e-12)
    # 60.1 s on 280 DGX nodes (2240 GPUs) = about 126 TFLOP/s per GPU (the paper's number)
    assert flops / 60.1 / 2240 / 1e12 == pytest.approx(126, rel=0.01)


def test_padded_vocab_and_model_flops_follow_the_hand_count():
    assert flops_per_iteration(MTNLG, 1920) == pytest.approx(
        expanded(1920, 2048, 105, 20480, 50257, False), rel=1e-12)
    # a small model, where the vocabulary term is a third of the total
    gpt2 = ModelConfig(num_layers=12, hidden_size=768, num_heads=12, seq_len=1024,
                       vocab_size=50257)
    for full in (False, True):
        assert flops_per_iteration(gpt2, 8, padded_vocab=50304, full_recompute=full) == \
            pytest.approx(expanded(8, 1024, 12, 768, 50304, full), rel=1e-12)


def test_model_flops_are_three_quarters_of_recompute_flops_for_large_h():
    # A realistic vocabulary: the logit GEMM is not recomputed, so the difference between the
    # two counts is the recomputed forward of the layers alone, whatever V is.
    B, s, l, h = 8, 2048, 100, 16384
    ratios = []
    for V in (50257, 256000):
        cfg = ModelConfig(num_layers=l, hidden_size=h, num_heads=128, seq_len=s, vocab_size=V)
        model, recompute = flops_per_iteration(cfg, B), flops_per_iteration(cfg, B,
                                                                            full_recompute=True)
        assert recompute - model == pytest.approx(24 * B * s * l * h * h * (1 + s / (6 * h)),
                                                  rel=1e-12)
        ratios.append(model / recompute)
    # 3/4 up to the vocabulary term: 0.75047 at V = 50257, 0.75237 at V = 256000
    assert ratios[0] == pytest.approx(0.75, rel=1e-3) and ratios[0] > 0.7504
    assert ratios[1] > ratios[0] + 0.0015
    # with a small h the vocabulary dominates and the ratio is far from 3/4
    gpt2 = ModelConfig(num_layers=12, hidden_size=768, num_heads=12, seq_len=1024,
                       vocab_size=50257)
    ratio = flops_per_iteration(gpt2, 8) / flops_per_iteration(gpt2, 8, full_recompute=True)
    assert ratio == pytest.approx(0.8045, abs=1e-4)


def test_mfu_is_achieved_over_peak():
    # One layer, h = s = 6, V = 12, one sequence: 72*6*36 + 12*36*6 + 6*6*6*12 = 20,736 model
    # FLOPs, counted by hand. On 2 A100s (312 TFLOP/s bf16 dense peak) in 0.1 ns: 20,736 /
    # 1e-10 / 2 = 1.0368e14 FLOP/s per GPU, an MFU of 1.0368e14 / 3.12e14 = 0.33231.
    toy = ModelConfig(num_layers=1, hidden_size=6, num_heads=1, seq_len=6, vocab_size=12)
    assert flops_per_iteration(toy, 1) == pytest.approx(20736, rel=1e-12)
    assert mfu(toy, 1, 1e-10, 2, 312) == pytest.approx(0.332308, rel=1e-5)
    # MT-NLG counted without recompute: its 126 TFLOP/s with recompute is about 30% MFU
    assert mfu(MTNLG, 1920, 60.1, 2240, 312) == pytest.approx(0.3024, abs=5e-4)


def mfu(cfg: ModelConfig, batch: int, step_time_s: float, devices: int, peak_tflops: float
        ) -> float:
    """The MFU a training record reports (nanomt.metrics.throughput): model FLOPs only."""
    flops = flops_per_iteration(cfg, batch)
    return throughput(step_time_s, batch, cfg.seq_len, flops, flops, devices, peak_tflops)["mfu"]


def test_hardware_flops_count_what_each_recompute_mode_reruns():
    # none: the model once; full: + one forward of every layer, 24 B s l h^2 + 4 B s^2 l h
    # (the 96 formula); selective: + the attention core's forward alone, 4 B s^2 l h
    from nanomt.flops import hardware_flops_per_iteration

    B, s, l, h, V = 8, 1024, 12, 768, 50304
    gpt2 = ModelConfig(num_layers=l, hidden_size=h, num_heads=12, seq_len=s, vocab_size=50257)
    model = expanded(B, s, l, h, V, False)
    assert hardware_flops_per_iteration(gpt2, B, "none", V) == pytest.approx(model, rel=1e-12)
    assert hardware_flops_per_iteration(gpt2, B, "selective", V) == pytest.approx(
        model + 4 * B * s * s * l * h, rel=1e-12)
    assert hardware_flops_per_iteration(gpt2, B, "full", V) == pytest.approx(
        model + 24 * B * s * l * h * h + 4 * B * s * s * l * h, rel=1e-12)
    assert hardware_flops_per_iteration(gpt2, B, "full", V) == pytest.approx(
        expanded(B, s, l, h, V, True), rel=1e-12)
    with pytest.raises(ValueError, match="recompute"):
        hardware_flops_per_iteration(gpt2, B, "sometimes")
