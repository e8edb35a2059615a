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

A mixture of experts (model.moe) counts ACTIVE parameters: the 72 counts, per token and layer,
3 passes x 2 FLOPs x (4 h^2 attention + 8 h^2 MLP weights); in an MoE layer the MLP's 8 h^2
becomes the weights a token really multiplies by, its k experts' m h ffn_e each (m = 2 GeLU,
3 SwiGLU), the shared experts' and the router's E h (`active_mlp_weights`):

    F_moe = F + (3 or 4 with full recompute) * 2 B s * moe_layers * (active MLP - 8 h^2)

MFU = model FLOPs per second / (number of GPUs * peak FLOP/s per GPU). MT-NLG 530B reached
126 TFLOP/s per A100 (40% of 312) counted with the first formula. Peaks are the datasheets' dense
tensor-core figures (never the 2:4 sparsity ones, twice as large), per card and precision.
"""

from __future__ import annotations

import warnings

from nanomt.model.config import ModelConfig


def active_mlp_weights(cfg: ModelConfig) -> int:
    """The matmul weights one token multiplies by in an MoE layer's MLP: its k experts, the
    shared experts (one MLP of their total width) and the router (biases are no matmul)."""
    moe, h = cfg.moe, cfg.hidden_size
    per_width = (2 if cfg.style == "gpt" else 3) * h * moe.ffn_hidden_size
    return (moe.top_k + moe.shared_experts) * per_width + moe.num_experts * h


def flops_per_iteration(cfg: ModelConfig, global_batch_size: int, padded_vocab: int | None = None,
                        full_recompute: bool = False) -> float:
    """Matrix-multiply FLOPs of one optimizer step (forward + backward [+ recompute])."""
    B, s, l, h = global_batch_size, cfg.seq_len, cfg.num_layers, cfg.hidden_size
    V = padded_vocab if padded_vocab is not None else cfg.vocab_size
    passes = 4 if full_recompute else 3  # forward, backward (2x) [, the recompute's forward]
    experts = 0.0
    if cfg.moe is not None:  # the module docstring's active-parameter correction
        experts = passes * 2 * B * s * cfg.moe.num_moe_layers(l) * (
            active_mlp_weights(cfg) - 8 * h * h)
    if full_recompute:
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h)) + experts
    return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h)) + experts


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


# Peak TFLOP/s per GPU by card: (dense bf16/fp16, dense TF32), from NVIDIA's datasheets (the
# dense figures, half the 2:4-sparsity ones they headline). fp32 training is scored against the
# TF32 peak: with train.tf32=true (the default) its matmuls run on TF32 tensor cores; with
# train.tf32=false they run on the far slower plain-fp32 units: set logging.peak_tflops then.
PEAK_TFLOPS = {
    "A100 SXM": (312.0, 156.0), "A100 PCIe": (312.0, 156.0),
    "H100 SXM": (989.0, 494.5), "H100 PCIe": (756.0, 378.0), "H100 NVL": (835.0, 417.5),
    "H200 SXM": (989.0, 494.5), "H200 NVL": (835.0, 417.5),
    "B200": (2250.0, 1100.0), "L40S": (362.0, 183.0),
}
# torch.cuda.get_device_name() of each card, exactly: a form factor is never guessed from a
# substring ("H100" alone would score an H100 PCIe against the SXM part's peak).
CARD_OF_DEVICE_NAME = {
    "NVIDIA A100-SXM4-40GB": "A100 SXM", "NVIDIA A100-SXM4-80GB": "A100 SXM",
    "NVIDIA A100-SXM-80GB": "A100 SXM", "NVIDIA A100-PCIE-40GB": "A100 PCIe",
    "NVIDIA A100 80GB PCIe": "A100 PCIe", "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL", "NVIDIA H200": "H200 SXM",
    "NVIDIA H200 NVL": "H200 NVL", "NVIDIA B200": "B200", "NVIDIA L40S": "L40S",
}
_PRECISION_COLUMN = {"bf16": 0, "fp16": 0, "fp32": 1}
_TOLD_UNKNOWN: set[str] = set()  # device names already reported as unknown


def peak_tflops(device_name: str, configured: float | None = None,
                precision: str = "bf16") -> float | None:
    """The peak MFU is measured against: `configured` (logging.peak_tflops) when given, else the
    table's entry for the card named exactly `device_name` at `precision` (train.precision),
    else None: MFU is logged as null (the CPU, and unknown cards, told once to set it)."""
    if precision not in _PRECISION_COLUMN:
        raise ValueError(f"train.precision must be one of {sorted(_PRECISION_COLUMN)}, "
                         f"got {precision!r}")
    if configured is not None:
        return float(configured)
    card = CARD_OF_DEVICE_NAME.get(device_name)
    if card is None:
        if device_name != "cpu" and device_name not in _TOLD_UNKNOWN:
            _TOLD_UNKNOWN.add(device_name)
            warnings.warn(f"no peak TFLOP/s known for {device_name!r}: MFU is logged as null; "
                          f"set logging.peak_tflops to the card's dense {precision} peak",
                          stacklevel=2)
        return None
    return PEAK_TFLOPS[card][_PRECISION_COLUMN[precision]]
