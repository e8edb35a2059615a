"""The metrics a run reports (nanomt.metrics), checked against their definitions: every key in
metrics.jsonl, throughput and TFLOP/s recomputed from the FLOPs formulas, MFU against the
configured peak, perplexity from the validation loss; W&B offline files written with a listener
standing in for the W&B server that must see no connection; the console lines in order."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanomt.flops import flops_per_iteration, hardware_flops_per_iteration, peak_tflops
from nanomt.metrics import EVAL_METRICS, STEP_METRICS, host_values_to, throughput
from nanomt.model import ModelConfig
from nanomt.testing import compose_config
from run_probes import ConnectionCounter
from nanomt.train import run

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.seq_len=64",
         "train.global_batch_size=16", "train.micro_batch_size=4", "optim.warmup_steps=2",
         "checkpoint.interval=0"]


# torch.cuda.get_device_name() of real cards -> dense (bf16/fp16, TF32) TFLOP/s (datasheets)
REAL_DEVICE_NAMES = {
    "NVIDIA A100-SXM4-80GB": (312.0, 156.0), "NVIDIA A100-SXM4-40GB": (312.0, 156.0),
    "NVIDIA A100-PCIE-40GB": (312.0, 156.0), "NVIDIA A100 80GB PCIe": (312.0, 156.0),
    "NVIDIA H100 80GB HBM3": (989.0, 494.5), "NVIDIA H100 PCIe": (756.0, 378.0),
    "NVIDIA H100 NVL": (835.0, 417.5), "NVIDIA H200": (989.0, 494.5),
    "NVIDIA B200": (2250.0, 1100.0), "NVIDIA L40S": (362.0, 183.0),
}


@pytest.mark.parametrize("name", sorted(REAL_DEVICE_NAMES))
def test_peak_table_by_exact_card_name_form_factor_and_precision(name):
    dense_16, dense_tf32 = REAL_DEVICE_NAMES[name]
    assert peak_tflops(name) == dense_16  # never the 2:4 sparsity figure, twice as large
    assert peak_tflops(name, precision="bf16") == peak_tflops(name, precision="fp16") == dense_16
    assert peak_tflops(name, precision="fp32") == dense_tf32  # TF32 tensor cores
    assert peak_tflops(name, configured=700) == 700.0


def test_an_unknown_card_has_no_peak_and_is_told_once_to_set_it():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert peak_tflops("Tesla T4") is None and peak_tflops("Tesla T4") is None
        assert peak_tflops("NVIDIA H100") is None  # no form factor: not guessed
        assert peak_tflops("cpu") is None
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all("logging.peak_tflops" in m for m in messages)
    assert throughput(1.0, 1, 1, 1e12, 1e12, 1, None)["mfu"] is None  # logged as null
    assert throughput(1.0, 1, 1, 1e12, 1e12, 1, 4.0)["mfu"] == 0.25
    with pytest.raises(ValueError, match="train.precision"):
        peak_tflops("NVIDIA H200", precision="fp8")


def test_logging_values_reach_a_gpu_through_pinned_memory(monkeypatch):
    """A pageable host-to-device copy waits for the GPU: the values are pinned, then copied
    with non_blocking=True (recorded here in place of a GPU); on CPU a plain tensor."""
    on_cpu = host_values_to(torch.device("cpu"), [3.0, 1.0])
    assert on_cpu.dtype == torch.float64 and on_cpu.tolist() == [3.0, 1.0]
    copies: list = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: copies.append("pin") or self)

    def to(self, device, non_blocking=False):
        copies.append((str(device), non_blocking))
        return self

    monkeypatch.setattr(torch.Tensor, "to", to)
    values = host_values_to(torch.device("cuda", 0), [2.0, 5.0])
    assert copies == ["pin", ("cuda:0", True)] and values.tolist() == [2.0, 5.0]


def test_every_metric_is_logged_and_agrees_with_its_definition(tmp_path, monkeypatch, capsys):
    listener = ConnectionCounter()
    monkeypatch.setenv("WANDB_BASE_URL", listener.url)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # would be sent, were anything sent
    cfg = compose_config(SMALL + [
        "train.steps=4", "train.eval_interval=2", "train.activation_checkpointing=selective",
        "logging.peak_tflops=0.5", "logging.log_interval=2", "logging.wandb.mode=offline",
        "logging.wandb.project=metrics-test", "logging.wandb.tags=[layout-a]"])
    try:
        run(cfg, tmp_path)
    finally:
        listener.stop()
    assert listener.http_requests == [], listener.first_bytes
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert set(STEP_METRICS) <= set(r)
    assert [r["step"] for r in records if set(EVAL_METRICS) <= set(r)] == [2, 4]

    model = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, seq_len=64, vocab_size=256)
    # selective recompute re-runs the attention core's forward: 4 B s^2 l h more than the model
    extra = 4 * 16 * 64 ** 2 * 2 * 64
    assert hardware_flops_per_iteration(model, 16, "selective") == \
        flops_per_iteration(model, 16) + extra
    for r in records:
        t = r["step_time_s"]
        assert r["tokens_per_s"] == pytest.approx(16 * 64 / t)
        assert r["model_tflops_per_gpu"] == pytest.approx(flops_per_iteration(model, 16) / t / 1e12)
        assert r["tflops_per_gpu"] == pytest.approx((flops_per_iteration(model, 16) + extra)
                                                    / t / 1e12)
        assert r["mfu"] == pytest.approx(r["model_tflops_per_gpu"] / 0.5)
        assert r["tokens"] == r["step"] * 16 * 64 and r["global_batch_size"] == 16
        assert r["loss_scale"] == 1.0 and r["skipped"] is False and r["skipped_steps"] == 0
        assert 0 < r["peak_memory_gb"] == r["peak_memory_gb_max_rank"] < 64
    assert records[-1]["val_ppl"] == pytest.approx(math.exp(records[-1]["val_loss"]))

    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    (stream,) = offline.glob("run-*.wandb")
    written = stream.read_bytes()  # the run's records: config, tags, every logged key
    for needle in ("metrics-test", "layout-a", "activation_checkpointing", "model_tflops_per_gpu",
                   "val_ppl"):
        assert needle.encode() in written, needle

    out = capsys.readouterr().out
    table, first_line = out.index("rank  tp  cp  pp  dp  host"), out.index("step 2/4 | loss")
    assert out.index("nanomt: ") < table < out.index("stage  layers") < first_line
    assert out.index("stage  layers") < out.index("train:")  # the bar comes after the tables
    assert "MFU " in out[first_line:].splitlines()[0]
