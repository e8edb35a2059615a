"""FLOPs and model FLOPs utilisation (MFU), as the Megatron papers count them.

Per iteration of global batch B, sequence s, l layers, hidden h, vocabulary V (GEMMs only):

    with full recompute (Narayanan et al. 2021, eq. 3):  F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h))
    model FLOPs, no recompute (Korthikanti et al. 2022):  F = 72 B s l h^2 (1 + s/(6h) + V/(12 l h))

The 96 counts one extra forward of every layer (full recompute: 72 + 24); selective recompute
(Korthikanti et al. 2022, section 5) re-runs only the attention core, Q K^T and scores x V, whose
forward is 4 B s^2 l h. Hardware FLOPs are what the GPU really executes, recompute included;
model FLOPs count the model once, whatever is recomputed:

    hardware FLOPs = model FLOPs + {none: 0,
                                    selective: 4 B s^2 l h,
                                    full: 24 B s l h^2 (1 + s/(6h))}

MFU = model FLOPs per second / (number of GPUs * peak FLOP/s per GPU). MT-NLG 530B reached
126 TFLOP/s per A100 (40% of 312) counted with the first formula. Peaks are the datasheets' dense
bf16 tensor-core figures (never the 2:4 sparsity ones, twice as large).
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


def hardware_flops_per_iteration(cfg: ModelConfig, global_batch_size: int, recompute: str,
                                 padded_vocab: int | None = None) -> float:
    """FLOPs the devices execute in one step under `recompute` (none | selective | full)."""
    if recompute == "full":
        return flops_per_iteration(cfg, global_batch_size, padded_vocab, full_recompute=True)
    model = flops_per_iteration(cfg, global_batch_size, padded_vocab)
    if recompute == "selective":
        return model + 4 * global_batch_size * cfg.seq_len ** 2 * cfg.num_layers * cfg.hidden_size
    if recompute == "none":
        return model
    raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")


# Dense bf16 tensor-core peaks, TFLOP/s per GPU (NVIDIA datasheets; SXM parts).
PEAK_TFLOPS_BF16 = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def peak_tflops(device_name: str, configured: float | None = None) -> float | None:
    """The peak MFU is measured against: `configured` (logging.peak_tflops) when given, else the
    table's entry for a known GPU named in `device_name`, else None (CPU, unknown GPUs)."""
    if configured is not None:
        return float(configured)
    for model, peak in PEAK_TFLOPS_BF16.items():
        if model in device_name.upper():
            return peak
    return None


def model_flops_utilization(cfg: ModelConfig, global_batch_size: int, step_time_s: float,
                            num_devices: int, peak_flops_per_device: float) -> float:
    """Fraction of the hardware's peak spent on the model's own FLOPs (no recompute counted)."""
    achieved = flops_per_iteration(cfg, global_batch_size) / step_time_s / num_devices
    return achieved / peak_flops_per_device
