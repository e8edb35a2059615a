"""FLOPs and model FLOPs utilisation (MFU), as the Megatron papers count them.

Per iteration of global batch B, sequence s, l layers, hidden h, vocabulary V (GEMMs only):

    with full recompute (Narayanan et al. 2021, eq. 3):  F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h))
    model FLOPs, no recompute (Korthikanti et al. 2022):  F = 72 B s l h^2 (1 + s/(6h) + V/(12 l h))

MFU = model FLOPs per second / (number of GPUs * peak FLOP/s per GPU). MT-NLG 530B reached
126 TFLOP/s per A100 (40% of 312) counted with the first formula.
"""

from __future__ import annotations

from nanomt.model.config import ModelConfig


def flops_per_iteration(cfg: ModelConfig, global_batch_size: int, padded_vocab: int | None = None,
                        full_recompute: bool = False) -> float:
    """Matrix-multiply FLOPs of one optimizer step (forward + backward [+ recompute])."""
    B, s, l, h = global_batch_size, cfg.seq_len, cfg.num_layers, cfg.hidden_size
    V = padded_vocab if padded_vocab is not None else cfg.vocab_size
    if full_recompute:
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))


def model_flops_utilization(cfg: ModelConfig, global_batch_size: int, step_time_s: float,
                            num_devices: int, peak_flops_per_device: float) -> float:
    """Fraction of the hardware's peak spent on the model's own FLOPs (no recompute counted)."""
    achieved = flops_per_iteration(cfg, global_batch_size) / step_time_s / num_devices
    return achieved / peak_flops_per_device
