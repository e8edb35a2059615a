"""Tensor-parallel training runs against the single-process run (gloo, CPU, fp32).

One spawn of four ranks: `nanomt.train.run` in-process at tp=4 (with and without SP) and
tp=2 x dp=2, whose 10-step loss trajectories and gradient norms must match the single-process
run; and the config errors every rank must raise before any collective.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanomt.config import check_config
from nanomt.testing import compose_config, run_distributed

WORLD = 4

FAST = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=32",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=10",
        "train.eval_interval=0", "train.eval_batches=1", "train.progress_bar=false",
        "logging.wandb.mode=disabled"]
TRAIN_LAYOUTS = {
    "tp4": ["parallel.tp=4"],
    "tp2_dp2": ["parallel.tp=2"],
    "tp4_sp": ["parallel.tp=4", "parallel.sequence_parallel=true"],
    "tp2_dp2_sp_llama": ["parallel.tp=2", "parallel.sequence_parallel=true", "model.style=llama",
                         "model.ffn_hidden_size=128"],
}
# Each must fail on every rank with a ValueError naming the key, before any collective.
BAD_CONFIGS = {
    "world_size": (["parallel.tp=2", "parallel.dp=1"], "parallel.tp/cp/pp/dp"),
    "heads": (["parallel.tp=4", "model.num_heads=6", "model.hidden_size=96"], "model.num_heads"),
    "sp_seq_len": (["parallel.tp=4", "parallel.sequence_parallel=true", "model.seq_len=30"],
                   "model.seq_len"),
}


def _training_runs(run_root: str) -> dict:
    from nanomt.train import run

    errors = {}
    for name, (overrides, _) in BAD_CONFIGS.items():
        try:
            run(compose_config(FAST + overrides), Path(run_root) / f"bad_{name}")
            errors[name] = "no error"
        except ValueError as error:
            errors[name] = str(error)
    for name, overrides in TRAIN_LAYOUTS.items():
        run(compose_config(FAST + overrides), Path(run_root) / name)
    return errors


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


@pytest.fixture(scope="module")
def training(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("tp_runs")
    errors = run_distributed(_training_runs, world_size=WORLD, args=(str(root),), timeout_s=400)
    return root, errors


@pytest.mark.parametrize("name", list(TRAIN_LAYOUTS))
def test_training_trajectory_matches_single_process(training, tmp_path, name):
    from nanomt.train import run

    root, _ = training
    model_overrides = [o for o in TRAIN_LAYOUTS[name] if o.startswith("model.")]
    run(compose_config(FAST + model_overrides), tmp_path / "reference")
    expected, got = losses(tmp_path / "reference"), losses(root / name)
    run_info = json.loads((root / name / "run.json").read_text())
    tp = run_info["layout"]["tp"]
    assert tp == int(TRAIN_LAYOUTS[name][0].split("=")[1]) and run_info["world_size"] == WORLD
    # Every rank really held a shard: fewer parameters than the whole model.
    assert all(r["num_parameters"] < run_info["model_parameters"] for r in run_info["ranks"])
    assert len(got) == len(expected) == 10
    assert expected[-1] < expected[0] - 0.1  # it does learn
    # fp32, a different summation order per layout; Adam keeps the drift tiny over 10 steps.
    assert got == pytest.approx(expected, rel=1e-5), (got, expected)
    # the global norm counts each replicated parameter (norms, row-parallel biases) once
    norms, expected_norms = losses(root / name, "grad_norm"), losses(tmp_path / "reference",
                                                                     "grad_norm")
    assert norms == pytest.approx(expected_norms, rel=1e-5), (norms, expected_norms)


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_layouts_fail_early_on_every_rank(training, name):
    _, errors = training
    overrides, key = BAD_CONFIGS[name]
    for rank_errors in errors:
        assert key in rank_errors[name], rank_errors[name]


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_check_config_names_the_key(name):
    overrides, key = BAD_CONFIGS[name]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_config(compose_config(FAST + overrides), world_size=WORLD)


def test_run_in_a_world_of_one_rejects_tp2(tmp_path):
    from nanomt.train import run

    with pytest.raises(ValueError, match="world size 1"):
        run(compose_config(FAST + ["parallel.tp=2"]), tmp_path)
