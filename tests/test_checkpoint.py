"""Checkpoints: bit-exact resume, resharding to other layouts, atomic saves under crashes,
SIGTERM, keep_last and clear errors for broken inputs (none of which touch a good checkpoint)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanomt.checkpoint import CheckpointError, CheckpointReader, load_checkpoint
from nanomt.checkpoint.format import Piece, assemble, cut, make_piece
from nanomt.config import NOT_IMPLEMENTED
from nanomt.model import GPT, ModelConfig
from nanomt.testing import compose_config, run_distributed
from nanomt.train import run

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_len=32",
         "train.global_batch_size=8", "train.micro_batch_size=2", "train.progress_bar=false",
         "train.eval_interval=0", "optim.warmup_steps=2", "train.device=cpu"]


def losses(run_dir: Path) -> list[float]:
    """Loss per step; a step logged twice (run killed after it, then resumed) counts last."""
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record["loss"]
    return [by_step[step] for step in sorted(by_step)]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- format pieces ----------------------------------------------------------------------------
def test_pieces_strip_vocab_padding_and_reassemble():
    full = torch.arange(10 * 4, dtype=torch.float32).view(10, 4)  # 10 real rows
    padded = torch.cat([full, torch.zeros(2, 4)])  # 12 rows: padding for tp=3
    pieces = []
    for rank in range(3):  # row shards [0,4) [4,8) [8,12): the last is half padding
        box = [[4 * rank, 4 * rank + 4], [0, 4]]
        made = make_piece("model/word_embedding.weight", "word_embedding.weight",
                          padded[4 * rank: 4 * rank + 4], [10, 4], box)
        pieces.append(made)
    assert pieces[2][0].box == [[8, 10], [0, 4]]
    assert torch.equal(assemble(pieces), full)
    # ZeRO-style flat ranges of a tp shard: [0, 6) and [6, 16) of the last shard's 16 elements
    flat_pieces = [make_piece("k", "word_embedding.weight", padded[8:12].reshape(-1)[a:b],
                              [10, 4], [[8, 12], [0, 4]], [a, b]) for a, b in ((0, 6), (6, 16))]
    assert flat_pieces[1][0].flat == [6, 8]  # clipped at the last real row
    whole = pieces[:2] + flat_pieces
    assert torch.equal(assemble(whole), full)
    # cut for another layout: tp=2 with 12 padded rows -> rows [6, 12), padding zero
    assert torch.equal(cut(full, [12, 4], [[6, 12], [0, 4]]), padded[6:12])
    with pytest.raises(CheckpointError, match="cover"):
        assemble(pieces[:2])
    assert isinstance(pieces[0][0], Piece)


# ---- bit-exact resume -------------------------------------------------------------------------
def test_exit_after_and_resume_is_bit_exact(tmp_path):
    # dropout on: the resumed run must also restore every RNG stream to match bit for bit
    overrides = SMALL + ["train.steps=20", "model.dropout=0.1", "optim.decay_steps=20"]
    run(compose_config(overrides), tmp_path / "whole")
    first = run(compose_config(overrides + ["train.exit_after=10"]), tmp_path / "split")
    assert first["steps"] == 10
    pointer = tmp_path / "split" / "checkpoints" / "latest"
    assert pointer.read_text().strip() == "step_00000010"
    run(compose_config(overrides + ["train.resume=auto"]), tmp_path / "split")
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert len(whole) == len(split) == 20
    assert whole == split  # every loss bit for bit


def test_fp16_zero3_resume_restores_master_weights_and_loss_scale(tmp_path):
    overrides = SMALL + ["train.steps=6", "train.precision=fp16", "optim.decay_steps=6",
                         "parallel.zero_stage=3"]  # weights exist only inside full_parameters()
    run(compose_config(overrides), tmp_path / "whole")
    run(compose_config(overrides + ["train.exit_after=3"]), tmp_path / "split")
    meta = json.loads((tmp_path / "split" / "checkpoints" / "step_00000003" / "meta.json")
                      .read_text())
    assert meta["optimizer_scalars"]["loss_scaler"]["scale"] > 1
    assert any(p["key"].startswith("optimizer/master/") for p in meta["shards"][0]["pieces"])
    run(compose_config(overrides + ["train.resume=auto"]), tmp_path / "split")
    assert losses(tmp_path / "whole") == losses(tmp_path / "split")


# ---- keep_last, broken inputs -----------------------------------------------------------------
def _small_model_config() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=32, vocab_size=256)


def test_keep_last_and_clear_errors_that_leave_good_checkpoints_alone(tmp_path):
    overrides = SMALL + ["train.steps=8", "checkpoint.interval=2", "checkpoint.keep_last=2"]
    run(compose_config(overrides), tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006", "step_00000008"]
    good = tree_digest(root)
    model_cfg = _small_model_config()

    def load(path, cfg=model_cfg):
        return load_checkpoint(path, [GPT(cfg)], None, None, cfg.to_dict())

    assert load(root)["step"] == 8  # follows latest

    def broken_copy(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(root, copy)
        return copy

    shard = Path("step_00000008") / "rank_00000.safetensors"
    truncated = broken_copy("truncated")
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(truncated)

    flipped = broken_copy("flipped")
    data = bytearray((flipped / shard).read_bytes())
    data[-5] ^= 0xFF
    (flipped / shard).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load(flipped)
    # without the hash check, safetensors itself must still refuse a broken header
    data = bytearray((flipped / shard).read_bytes())
    data[8:16] = b"\xff" * 8
    (flipped / shard).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        CheckpointReader(flipped / "step_00000008", verify=False).full("model/final_norm.weight")

    missing = broken_copy("missing")
    (missing / shard).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load(missing)

    dangling = broken_copy("dangling")
    (dangling / "latest").write_text("step_00000010\n")
    with pytest.raises(CheckpointError, match="step_00000010"):
        load(dangling)
    # ... and a run asked to resume from it fails before it writes anything
    with pytest.raises(CheckpointError, match="step_00000010"):
        run(compose_config(overrides + [f"train.resume={dangling}", "train.steps=12"]),
            tmp_path / "resumer")

    other = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, seq_len=32, vocab_size=256)
    with pytest.raises(CheckpointError, match="model.hidden_size: checkpoint 32, run 64"):
        load(root, other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")
    assert tree_digest(root) == good  # nothing above touched the good checkpoints
    assert tree_digest(dangling / "step_00000008") == {
        k[len("step_00000008/"):]: v for k, v in good.items() if k.startswith("step_00000008/")}


# ---- crashes in the middle of a save, SIGTERM -------------------------------------------------
CRASHING_RUN = """
import os, signal, sys
from pathlib import Path
import nanomt.checkpoint.save as save
from nanomt.testing import compose_config
from nanomt.train import run

stage, run_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
seen = []
def crash_on_second_save(reached):
    if reached == stage:
        seen.append(reached)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a node failure
save.FAULT_HOOK = crash_on_second_save
run(compose_config(overrides), Path(run_dir))
"""


def _python_env() -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    overrides = SMALL + ["train.steps=4", "checkpoint.interval=2"]
    run(compose_config(overrides), tmp_path / "whole")
    for stage in ("shards_written", "before_latest"):
        run_dir = tmp_path / stage
        proc = subprocess.run([sys.executable, "-c", CRASHING_RUN, stage, str(run_dir)]
                              + overrides, env=_python_env(), capture_output=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        root = run_dir / "checkpoints"
        assert (root / "latest").read_text().strip() == "step_00000002"
        model_cfg = _small_model_config()
        assert load_checkpoint(root, [GPT(model_cfg)], None, None,
                               model_cfg.to_dict())["step"] == 2
        # resuming continues as if nothing had happened
        run(compose_config(overrides + ["train.resume=auto"]), run_dir)
        steps = [json.loads(line)["step"] for line in
                 (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]  # the steps logged after the last checkpoint were dropped
        assert losses(run_dir) == losses(tmp_path / "whole")
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002",
                                                          "step_00000004"]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanomt.train", *SMALL, "train.steps=100000",
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, env=_python_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output.decode()[-2000:]
    steps_logged = len(metrics.read_text().splitlines())
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step_{steps_logged:08d}"
    meta = json.loads((root / f"step_{steps_logged:08d}" / "meta.json").read_text())
    assert meta["step"] == steps_logged and meta["data"]["next_step"] == steps_logged


# ---- resharding to other layouts --------------------------------------------------------------
# vocab_pad_multiple=3: 258 padded rows at tp=1 and 2, 264 at tp=4: padding must not leak.
RESHARD = SMALL + ["model.num_layers=4", "model.vocab_pad_multiple=3", "train.micro_batch_size=1",
                   "train.steps=8", "optim.decay_steps=8", "train.eval_batches=4"]
ZERO_LANDED = not any("ZeRO" in description for description, _ in NOT_IMPLEMENTED)
SAVED_LAYOUT = "tp2_pp2_dp2"
RESUMED_LAYOUTS = {  # name: (tp, pp, virtual stages, zero stage), dp = 8 / (tp * pp)
    "tp1_pp4_dp2": (1, 4, 1, 2),
    "tp4_pp1_dp2": (4, 1, 1, 3),
    "tp1_pp2v2_dp4": (1, 2, 2, 1),
}


def _layout(tp: int, pp: int, virtual_stages: int, zero_stage: int) -> list[str]:
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.virtual_stages={virtual_stages}",
            f"parallel.zero_stage={zero_stage if ZERO_LANDED else 0}"]


def _save_then_resume_on_other_layouts(base: str) -> int:
    """On 8 ranks: 4 steps at (tp, pp, dp, zero) = (2, 2, 2, 1) and save; resume elsewhere."""
    base = Path(base)
    run(compose_config(RESHARD + _layout(2, 2, 1, 1) + ["train.exit_after=4"]),
        base / SAVED_LAYOUT)
    saved = base / SAVED_LAYOUT / "checkpoints"
    for name, layout in RESUMED_LAYOUTS.items():
        run(compose_config(RESHARD + _layout(*layout) + [f"train.resume={saved}"]), base / name)
    # the same layout: bit for bit against an uninterrupted run (ZeRO shards, per-rank RNG)
    run(compose_config(RESHARD + _layout(2, 2, 1, 1)), base / "same_layout_whole")
    run(compose_config(RESHARD + _layout(2, 2, 1, 1) + ["train.resume=auto"]),
        base / SAVED_LAYOUT)
    return 0


def test_resume_on_other_layouts(tmp_path):
    run(compose_config(RESHARD), tmp_path / "reference")
    run_distributed(_save_then_resume_on_other_layouts, world_size=8, args=(str(tmp_path),),
                    timeout_s=400)
    # ... and on a single process
    step_4 = tmp_path / SAVED_LAYOUT / "checkpoints" / "step_00000004"  # not the latest any more
    run(compose_config(RESHARD + [f"train.resume={step_4}"]), tmp_path / "single")
    reference = losses(tmp_path / "reference")
    assert losses(tmp_path / SAVED_LAYOUT) == losses(tmp_path / "same_layout_whole")
    assert losses(tmp_path / SAVED_LAYOUT) == pytest.approx(reference, rel=1e-5)
    for name in [*RESUMED_LAYOUTS, "single"]:
        resumed = losses(tmp_path / name)
        assert len(resumed) == 4, name
        assert resumed == pytest.approx(reference[4:], rel=1e-5), name
