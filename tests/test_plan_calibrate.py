"""tools/plan.py --calibrate (nanomt.planner.calibrate): measured on 2 gloo ranks, the machine
file holds positive rates and a latency, the search reads it through plan.machine_file, and
the keys it holds override plan.*; the median over ranks and bubble_cost's rule by hand."""

from __future__ import annotations

import json

import pytest

from nanomt.planner.calibrate import machine_file
from nanomt.planner.from_config import machine
from nanomt.testing import compose_config
from planner_tool import plan_tool


def test_machine_file_takes_the_median_over_ranks():
    ranks = [{"matmul_tflops": m, "model_tflops": m / 2, "all_reduce_gbps": 1.0,
              "all_gather_gbps": 2.0, "reduce_scatter_gbps": 4.0, "p2p_gbps": 8.0,
              "latency_us": 5.0 * m, "ping_us": 1.0, "memory_gbps": 3.0} for m in (1, 2, 9)]
    found = machine_file(ranks, world=10_000)
    assert found["peak_tflops"] == 2 and found["compute_efficiency"] == 0.5
    assert found["intra_node_gbps"] == found["inter_node_gbps"] == 2.0  # the middle collective
    assert found["latency_us"] == 10 and found["gpus_per_node"] == 10_000
    assert found["bubble_cost"] == 0.0  # 10,000 ranks outnumber any host's cores
    assert machine_file(ranks, world=1)["bubble_cost"] == 1.0


def test_calibrate_writes_a_file_the_search_reads(tmp_path, capsys):
    path = tmp_path / "machine.json"
    model = ["model=tiny", "model.num_layers=2", "model.hidden_size=64", "model.seq_len=64",
             "train.micro_batch_size=2", "train.global_batch_size=8"]
    assert plan_tool().main(["--calibrate", *model, "plan.gpus=2",
                             f"plan.machine_file={path}"]) == 0
    found = json.loads(path.read_text())
    for key in ("peak_tflops", "compute_efficiency", "intra_node_gbps", "memory_gbps"):
        assert found[key] > 0, key
    assert found["latency_us"] >= 0 and found["gpus_per_node"] == 2
    cfg = compose_config(model + ["+plan=default", f"plan.machine_file={path}",
                                  "plan.peak_tflops=999"])
    read = machine(cfg)
    assert read.peak_tflops == pytest.approx(found["peak_tflops"])  # the file wins over plan.*
    assert read.memory_gbps == pytest.approx(found["memory_gbps"])
    capsys.readouterr()
    assert plan_tool().main(["--search", "--json", *model, "plan.gpus=2",
                             f"plan.machine_file={path}"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert ranked["machine"]["peak_tflops"] == pytest.approx(found["peak_tflops"])
    assert ranked["best"] and ranked["best"][0]["step_time_s"] > 0
