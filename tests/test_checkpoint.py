"""Checkpoints: bit-exact resume, resharding to other layouts, atomic saves under crashes,
SIGTERM, keep_last and clear errors for broken inputs (none of which touch a good checkpoint)."""

from __future__ import annotations

import hashlib
import importlib.util
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

import nanomt.checkpoint.load as checkpoint_load
import nanomt.checkpoint.save as checkpoint_save
from nanomt.checkpoint import (
    CheckpointError,
    CheckpointReader,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from nanomt.checkpoint.format import Piece, TensorSource, make_piece, read_region
from nanomt.model import GPT, ModelConfig
from nanomt.parallel.data_parallel.stage3 import ParameterGatherer
from nanomt.testing import compose_config, run_distributed
from nanomt.train import run
from model_outputs import full_logits

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
def test_pieces_strip_vocab_padding_and_slices_read_back():
    full = torch.arange(10 * 4, dtype=torch.float32).view(10, 4)  # 10 real rows
    padded = torch.cat([full, torch.zeros(2, 4)])  # 12 rows: padding for tp=3
    pieces = []
    for rank in range(3):  # row shards [0,4) [4,8) [8,12): the last is half padding
        box = [[4 * rank, 4 * rank + 4], [0, 4]]
        made = make_piece("model/word_embedding.weight", "word_embedding.weight",
                          padded[4 * rank: 4 * rank + 4], [10, 4], box)
        pieces.append(made)
    assert pieces[2][0].box == [[8, 10], [0, 4]]
    stored = [(piece, TensorSource(tensor)) for piece, tensor in pieces]
    assert torch.equal(read_region(stored, [[0, 10], [0, 4]]), full)
    # ZeRO-style flat ranges of a tp shard: [0, 6) and [6, 16) of the last shard's 16 elements
    flat_pieces = [make_piece("k", "word_embedding.weight", padded[8:12].reshape(-1)[a:b],
                              [10, 4], [[8, 12], [0, 4]], [a, b]) for a, b in ((0, 6), (6, 16))]
    assert flat_pieces[1][0].flat == [6, 8]  # clipped at the last real row
    mixed = stored[:2] + [(piece, TensorSource(tensor)) for piece, tensor in flat_pieces]
    assert torch.equal(read_region(mixed, [[0, 10], [0, 4]]), full)
    # slices for other layouts: tp=2 with 12 padded rows -> rows [6, 12), padding zero; a column
    # split; flat ranges of those (another ZeRO shard), across piece borders
    for box in ([[6, 12], [0, 4]], [[0, 12], [2, 4]], [[0, 6], [0, 4]]):
        expected = padded[box[0][0]: box[0][1], box[1][0]: box[1][1]]
        assert torch.equal(read_region(mixed, box), expected)
        numel = expected.numel()
        for a, b in ((0, numel), (3, 17), (5, 6), (numel - 7, numel)):
            assert torch.equal(read_region(mixed, box, [a, b]), expected.reshape(-1)[a:b])
    with pytest.raises(CheckpointError, match="cover"):
        read_region(stored[:2], [[0, 10], [0, 4]])
    assert isinstance(pieces[0][0], Piece)


class CountingOpen:
    """safe_open, counting files opened and whole-tensor reads."""

    def __init__(self, real):
        self.real, self.opened, self.whole_reads = real, 0, 0

    def __call__(self, *args, **kwargs):
        self.opened += 1
        handle, counter = self.real(*args, **kwargs), self

        class Handle:
            def get_slice(self, key):
                return handle.get_slice(key)

            def get_tensor(self, key):
                counter.whole_reads += 1
                return handle.get_tensor(key)
        return Handle()


def test_loading_opens_each_shard_once_and_reads_slices(tmp_path, monkeypatch):
    model_cfg = _small_model_config()
    model = GPT(model_cfg, seed=1)
    save_checkpoint(tmp_path, 3, [model], None, None, {"model": model_cfg.to_dict()})
    counting = CountingOpen(checkpoint_load.safe_open)
    monkeypatch.setattr(checkpoint_load, "safe_open", counting)
    loaded = GPT(model_cfg, seed=2)
    load_checkpoint(tmp_path, [loaded], None, None, model_cfg.to_dict())
    assert counting.opened == 1 and counting.whole_reads == 0
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


def test_seq_len_refused_only_where_it_shapes_a_tensor(tmp_path):
    for style in ("gpt", "llama"):
        short = ModelConfig(style=style, num_layers=1, hidden_size=16, num_heads=2, seq_len=8,
                            vocab_size=32)
        save_checkpoint(tmp_path / style, 1, [GPT(short)], None, None,
                        {"model": short.to_dict()})
        longer = ModelConfig(**{**short.to_dict(), "seq_len": 16})
        if style == "gpt":  # the learned position embedding has seq_len rows
            with pytest.raises(CheckpointError, match="model.seq_len: checkpoint 8, run 16"):
                load_checkpoint(tmp_path / style, [GPT(longer)], None, None, longer.to_dict())
        else:  # RoPE: no tensor depends on it
            load_checkpoint(tmp_path / style, [GPT(longer)], None, None, longer.to_dict())



def test_dense_width_refused_only_where_a_layer_is_dense(tmp_path):
    """With experts in every layer the dense ffn_hidden_size shapes no tensor (a Mixtral import
    sets it to the experts' width): it may differ; with one dense layer it may not."""
    for every in (1, 2):
        moe = {"num_experts": 2, "top_k": 1, "ffn_hidden_size": 16, "every": every}
        saved = ModelConfig(style="llama", num_layers=2, hidden_size=16, num_heads=2,
                            seq_len=8, vocab_size=32, ffn_hidden_size=32, moe=moe)
        save_checkpoint(tmp_path / str(every), 1, [GPT(saved)], None, None,
                        {"model": saved.to_dict()})
        wider = ModelConfig(**{**saved.to_dict(), "ffn_hidden_size": 48, "moe": moe})
        if every == 2:
            with pytest.raises(CheckpointError, match="model.ffn_hidden_size: checkpoint 32"):
                load_checkpoint(tmp_path / "2", [GPT(wider)], None, None, wider.to_dict())
        else:
            load_checkpoint(tmp_path / "1", [GPT(wider)], None, None, wider.to_dict())

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


def _no_gathering(*args, **kwargs):
    raise AssertionError("a checkpoint gathered ZeRO-3's whole model")


FP16_ZERO3 = SMALL + ["train.steps=6", "train.precision=fp16", "optim.decay_steps=6",
                      "parallel.zero_stage=3", "parallel.dp=2"]  # weights exist as dp shards


def _fp16_zero3_whole_then_split(base: str) -> int:
    """On 2 dp ranks: 6 steps at once, and 3 + 3 with a save and a resume between."""
    import unittest.mock

    base = Path(base)
    # saving and loading work on each rank's shards: the whole model is never gathered
    with unittest.mock.patch.object(ParameterGatherer, "gather_all", _no_gathering):
        run(compose_config(FP16_ZERO3), base / "whole")
        run(compose_config(FP16_ZERO3 + ["train.exit_after=3"]), base / "split")
        run(compose_config(FP16_ZERO3 + ["train.resume=auto"]), base / "split")
    return 0


def test_fp16_zero3_resume_restores_master_weights_and_loss_scale(tmp_path):
    run_distributed(_fp16_zero3_whole_then_split, world_size=2, args=(str(tmp_path),),
                    timeout_s=300)
    meta = json.loads((tmp_path / "split" / "checkpoints" / "step_00000003" / "meta.json")
                      .read_text())
    assert meta["optimizer_scalars"]["loss_scaler"]["scale"] > 1
    # each dp rank wrote its own flat range of the weights and of the fp32 masters
    for prefix in ("model/", "optimizer/master/"):
        writers = {shard["rank"] for shard in meta["shards"] for piece in shard["pieces"]
                   if piece["key"].startswith(prefix) and piece["flat"] is not None}
        assert writers == {0, 1}, prefix
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert len(whole) == 6 and whole == split


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


def _tiny() -> tuple[ModelConfig, dict]:
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_heads=2, seq_len=8, vocab_size=32)
    return cfg, {"model": cfg.to_dict(), "layout": {}}


def test_going_back_to_an_earlier_step_sets_later_checkpoints_aside(tmp_path):
    cfg, meta = _tiny()
    model = GPT(cfg)
    for step in (5, 10, 20):
        save_checkpoint(tmp_path, step, [model], None, None, meta, keep_last=2)
    # the run goes back to step 10 (say, after a loss spike) and continues from there
    for step in (11, 12):
        save_checkpoint(tmp_path, step, [model], None, None, meta, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step_00000011", "step_00000012", "step_00000020.abandoned"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000012"


class SimulatedCrash(Exception):
    pass


def test_saving_a_step_again_killed_between_its_renames_keeps_a_good_copy(tmp_path,
                                                                          monkeypatch):
    cfg, meta = _tiny()
    first, second = GPT(cfg, seed=1), GPT(cfg, seed=2)
    save_checkpoint(tmp_path, 4, [first], None, None, meta)

    def crash(stage: str) -> None:
        if stage == "between_renames":
            raise SimulatedCrash  # nothing cleaned up: the disk as a killed process leaves it

    monkeypatch.setattr(checkpoint_save, "FAULT_HOOK", crash)
    with pytest.raises(SimulatedCrash):
        save_checkpoint(tmp_path, 4, [second], None, None, meta)
    monkeypatch.setattr(checkpoint_save, "FAULT_HOOK", None)
    assert not (tmp_path / "step_00000004").exists()  # what `latest` names is gone ...
    assert resolve_checkpoint(tmp_path).name == "step_00000004.previous"  # ... the old copy is
    loaded = GPT(cfg, seed=3)
    load_checkpoint(tmp_path, [loaded], None, None, cfg.to_dict())
    assert torch.equal(loaded.word_embedding.weight, first.word_embedding.weight)
    save_checkpoint(tmp_path, 4, [second], None, None, meta)  # saving again cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004"]
    load_checkpoint(tmp_path, [loaded], None, None, cfg.to_dict())
    assert torch.equal(loaded.word_embedding.weight, second.word_embedding.weight)


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


@pytest.mark.parametrize("metrics_interval", [1, 7])
def test_sigterm_saves_and_exits_with_the_preempted_code(tmp_path, metrics_interval):
    """The signal is read at the next step; that step saves, writes its record (also between
    two records of logging.metrics_interval) and exits with code 3."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanomt.train", *SMALL, "train.steps=100000",
           f"logging.metrics_interval={metrics_interval}", f"hydra.run.dir={run_dir}"]
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
    assert proc.returncode == 3, output.decode()[-2000:]  # ExitCode.PREEMPTED
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps_logged = records[-1]["step"]  # the preempted step's record
    assert [r["step"] for r in records[:-1]] == [
        metrics_interval * k for k in range(1, len(records))]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step_{steps_logged:08d}"
    meta = json.loads((root / f"step_{steps_logged:08d}" / "meta.json").read_text())
    assert meta["step"] == steps_logged and meta["data"]["next_step"] == steps_logged


# ---- resharding to other layouts --------------------------------------------------------------
# vocab_pad_multiple=3: 258 padded rows at tp=1 and 2, 264 at tp=4: padding must not leak.
RESHARD = SMALL + ["model.num_layers=4", "model.vocab_pad_multiple=3", "train.micro_batch_size=1",
                   "train.steps=8", "optim.decay_steps=8", "train.eval_batches=4"]
SAVED_LAYOUT = "tp2_pp2_dp2"
RESUMED_LAYOUTS = {  # name: (tp, pp, virtual stages, zero stage), dp = 8 / (tp * pp)
    "tp1_pp4_dp2": (1, 4, 1, 2),
    "tp4_pp1_dp2": (4, 1, 1, 3),
    "tp1_pp2v2_dp4": (1, 2, 2, 1),
}


DROPOUT = ["model.dropout=0.1", "train.steps=4", "optim.decay_steps=4"]


def _layout(tp: int, pp: int, virtual_stages: int, zero_stage: int) -> list[str]:
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.virtual_stages={virtual_stages}",
            f"parallel.zero_stage={zero_stage}"]


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
    # ... and with dropout, where the tp-parallel and per-stage RNG streams must resume too
    dropout = RESHARD + _layout(2, 2, 1, 1) + DROPOUT
    run(compose_config(dropout), base / "dropout_whole")
    run(compose_config(dropout + ["train.exit_after=2"]), base / "dropout_split")
    run(compose_config(dropout + ["train.resume=auto"]), base / "dropout_split")
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
    dropout_whole = losses(tmp_path / "dropout_whole")
    assert len(dropout_whole) == 4 and losses(tmp_path / "dropout_split") == dropout_whole
    assert dropout_whole != reference[:4]  # dropout was on
    assert losses(tmp_path / SAVED_LAYOUT) == pytest.approx(reference, rel=1e-5)
    for name in [*RESUMED_LAYOUTS, "single"]:
        resumed = losses(tmp_path / name)
        assert len(resumed) == 4, name
        assert resumed == pytest.approx(reference[4:], rel=1e-5), name
    _check_zero3_shards_saved_by_every_dp_rank(tmp_path)
    _check_export_of_a_tp2_pp2_checkpoint(step_4, tmp_path / "hf")


def _load_single(folder: Path) -> GPT:
    model_cfg = ModelConfig.from_dict(json.loads((folder / "meta.json").read_text())["model"])
    model = GPT(model_cfg)
    load_checkpoint(folder, [model], None, None, model_cfg.to_dict())
    return model


def _check_zero3_shards_saved_by_every_dp_rank(base: Path) -> None:
    """tp4 x dp2 under ZeRO-3 wrote its weights as flat pieces of each dp rank's shard; they
    load on one process and agree with another layout's run of the same steps."""
    zero3 = base / "tp4_pp1_dp2" / "checkpoints" / "step_00000008"
    shards = json.loads((zero3 / "meta.json").read_text())["shards"]
    writers = {shard["rank"] for shard in shards for piece in shard["pieces"]
               if piece["key"].startswith("model/") and piece["flat"] is not None}
    assert len(writers) == 8  # every (tp, dp) rank wrote its own range
    other = _load_single(base / "tp1_pp4_dp2" / "checkpoints" / "step_00000008")
    for (name, a), (_, b) in zip(_load_single(zero3).named_parameters(),
                                 other.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def _check_export_of_a_tp2_pp2_checkpoint(folder: Path, hf_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("convert_hf", ROOT / "tools" / "convert_hf.py")
    convert_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_hf)
    convert_hf.main(["export", "--checkpoint", str(folder), "--output", str(hf_dir)])
    model = _load_single(folder)
    model.eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16),
                           generator=torch.Generator().manual_seed(0))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), local_files_only=True, dtype=torch.float32)
    hf_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, full_logits(model, tokens),
                                   rtol=1e-4, atol=1e-4)
