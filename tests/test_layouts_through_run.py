"""Short runs through `nanomt.train.run` on 2 gloo ranks against the single-process run.

Each case trains a few steps on a parallel layout and compares every step's loss and gradient
norm with the same config on one process: the GPipe schedule at pp=2, the Llama model under
ZeRO 1, 2 and 3 at dp=2, bf16 at dp=2 and fp16 under ZeRO-3 at dp=2. One spawn runs every case
in sequence (about 10 s in all).

Every case must match to rel 1e-5, the 16-bit ones too: their dp ranks sum fp32 gradients in
another order, and a master weight near a rounding boundary can round to the other bf16/fp16
value, but that moves the loss and norm by about 1e-7 (measured). bf16 and fp32 losses differ
by only ~5e-5, so for the 16-bit cases the test also asserts the dtypes a step uses, and that
the losses are nearer the single-process run of the same precision than the fp32 run: a
precision silently ignored cannot pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanomt.testing import compose_config, run_distributed
from run_probes import step_dtypes

COMMON = ["train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=2",
          "train.eval_interval=0", "train.eval_batches=1", "train.progress_bar=false",
          "train.measure_memory=false", "optim.warmup_steps=2", "optim.lr=3e-3",
          "checkpoint.interval=0", "logging.wandb.mode=disabled", "model.dropout=0.0"]
GPT = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=32"]
LLAMA = ["model=llama_tiny", "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4",
         "model.ffn_hidden_size=176", "model.seq_len=32"]
# bf16/fp16 matmuls are ~150x slower than fp32 on these CPUs: a smaller model still
LOW = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_len=16"]
BF16, FP16 = LOW + ["train.precision=bf16"], LOW + ["train.precision=fp16"]
DP2 = ["parallel.dp=2"]

CASES = {  # name: (the single-process config, the layout)
    "gpipe_pp2": (GPT, ["parallel.pp=2", "parallel.schedule=gpipe"]),
    "llama_zero1_dp2": (LLAMA, DP2 + ["parallel.zero_stage=1"]),
    "llama_zero2_dp2": (LLAMA, DP2 + ["parallel.zero_stage=2"]),
    "llama_zero3_dp2": (LLAMA, DP2 + ["parallel.zero_stage=3"]),
    "bf16_dp2": (BF16, DP2 + ["parallel.zero_stage=1"]),
    "fp16_zero3_dp2": (FP16, DP2 + ["parallel.zero_stage=3"]),
}
LOW_PRECISION = {"bf16_dp2": torch.bfloat16, "fp16_zero3_dp2": torch.float16}


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def grad_norms(run_dir: Path) -> list[float]:
    return [json.loads(line)["grad_norm"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run_every_case(root: str) -> dict:
    """On 2 ranks: every case through nanomt.train.run, then the dtypes of the 16-bit ones."""
    from nanomt.train import run

    for name, (model, layout) in CASES.items():
        run(compose_config(COMMON + model + layout), Path(root) / name)
    return {name: step_dtypes(compose_config(COMMON + CASES[name][0] + CASES[name][1]),
                              Path(root) / f"{name}_dtypes")
            for name in LOW_PRECISION}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    from nanomt.train import run

    root = tmp_path_factory.mktemp("layouts")
    dtypes = run_distributed(_run_every_case, world_size=2, args=(str(root),), timeout_s=300,
                             collective_timeout_s=120)
    for name, overrides in {"gpt": GPT, "llama": LLAMA, "bf16": BF16, "fp16": FP16,
                            "low_fp32": LOW}.items():
        run(compose_config(COMMON + overrides), root / f"single_{name}")
    return root, dtypes


@pytest.mark.parametrize("name, single", [("gpipe_pp2", "gpt"), ("llama_zero1_dp2", "llama"),
                                          ("llama_zero2_dp2", "llama"),
                                          ("llama_zero3_dp2", "llama")])
def test_fp32_layouts_match_the_single_process(runs, name, single):
    root, _ = runs
    reference = losses(root / f"single_{single}")
    assert len(reference) == 4 and reference[-1] < reference[0]  # it trains
    assert losses(root / name) == pytest.approx(reference, rel=1e-5)
    # the norm too: Adam and clipping forgive a gradient off by a constant factor, the norm not
    assert grad_norms(root / name) == pytest.approx(grad_norms(root / f"single_{single}"),
                                                    rel=1e-5)


@pytest.mark.parametrize("name, single", [("bf16_dp2", "bf16"), ("fp16_zero3_dp2", "fp16")])
def test_16_bit_layouts_match_the_single_process(runs, name, single):
    root, dtypes = runs
    dtype = LOW_PRECISION[name]
    for rank_dtypes in dtypes:  # 16-bit compute, fp32 gradient accumulation and masters
        assert rank_dtypes[name] == {"params": {dtype}, "autograd_grads": {dtype},
                                     "accumulated_grads": {torch.float32},
                                     "masters": {torch.float32}}
    parallel, reference = losses(root / name), losses(root / f"single_{single}")
    fp32 = losses(root / "single_low_fp32")
    assert parallel == pytest.approx(reference, rel=1e-5)
    assert grad_norms(root / name) == pytest.approx(grad_norms(root / f"single_{single}"),
                                                    rel=1e-5)
    gap_to_same, gap_to_fp32 = (sum(abs(a - b) for a, b in zip(parallel[1:], other[1:]))
                                for other in (reference, fp32))
    assert gap_to_same < gap_to_fp32, (parallel, reference, fp32)
