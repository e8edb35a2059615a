"""Context parallelism through `nanomt.train.run`: 10-step runs on 8 gloo ranks whose losses
and gradient norms equal the single-process run (fp32, rel 1e-5), and checkpoints that move
between cp=2 and cp=1 both ways (the format is layout-independent).

Cases: tp=2 x cp=2 x dp=2 with sequence parallelism; cp=2 x pp=2 x dp=2 under ZeRO-2 (the
pipeline carries [s/cp, b, h]) and with interleaved 1F1B (2 virtual stages); Llama (RoPE at each rank's own positions) at cp=4 x dp=2 under
ZeRO-3 (gradients and shards over the dp x cp group of 8) with full recompute (the ring runs
again in backward)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanomt.testing import compose_config, run_distributed
from test_layouts_through_run import COMMON as SHORT_RUN
from test_layouts_through_run import GPT, LLAMA

# the layouts test's short run, 10 steps long and saving at step 5
COMMON = [o for o in SHORT_RUN if not o.startswith(("train.steps=", "checkpoint.interval="))
          ] + ["train.steps=10", "checkpoint.interval=5"]
GPT_4_LAYERS = GPT + ["model.num_layers=4"]
CASES = {  # name: (model, layout on 8 ranks)
    "tp2_cp2_dp2_sp": (GPT, ["parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true"]),
    "cp2_pp2_dp2_zero2": (GPT, ["parallel.cp=2", "parallel.pp=2", "parallel.zero_stage=2"]),
    "cp2_pp2_interleaved_dp2": (GPT_4_LAYERS, ["parallel.cp=2", "parallel.pp=2",
                                               "parallel.virtual_stages=2"]),
    "llama_cp4_dp2_zero3_recompute": (LLAMA, ["parallel.cp=4", "parallel.zero_stage=3",
                                              "train.activation_checkpointing=full"]),
}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run_cases(root: str) -> int:
    from nanomt.train import run

    root = Path(root)
    for name, (model, layout) in CASES.items():
        run(compose_config(COMMON + model + layout), root / name)
    # ... and back: cp=2 resumes the single-process run's checkpoint of step 5
    step_5 = root / "single_gpt" / "checkpoints" / "step_00000005"
    run(compose_config(COMMON + GPT + CASES["tp2_cp2_dp2_sp"][1] + [f"train.resume={step_5}"]),
        root / "cp2_from_cp1")
    return 0


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from nanomt.train import run

    root = tmp_path_factory.mktemp("context_parallel")
    for name, model in (("single_gpt", GPT), ("single_llama", LLAMA),
                        ("single_gpt_4_layers", GPT_4_LAYERS)):
        run(compose_config(COMMON + model), root / name)
    run_distributed(_run_cases, world_size=8, args=(str(root),), timeout_s=400,
                    collective_timeout_s=120)
    step_5 = root / "tp2_cp2_dp2_sp" / "checkpoints" / "step_00000005"
    run(compose_config(COMMON + GPT + [f"train.resume={step_5}"]), root / "cp1_from_cp2")
    return root


@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_runs_equal_the_single_process(root, name):
    references = {tuple(GPT): "single_gpt", tuple(LLAMA): "single_llama",
                  tuple(GPT_4_LAYERS): "single_gpt_4_layers"}
    single = records(root / references[tuple(CASES[name][0])])
    got = records(root / name)
    assert [r["step"] for r in got] == list(range(1, 11))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in single], rel=1e-5), key


@pytest.mark.parametrize("name", ["cp1_from_cp2", "cp2_from_cp1"])
def test_checkpoints_move_between_cp_2_and_cp_1(root, name):
    resumed = records(root / name)
    assert [r["step"] for r in resumed] == list(range(6, 11))
    reference = records(root / "single_gpt")[5:]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in reference],
                                                          rel=1e-5), key
