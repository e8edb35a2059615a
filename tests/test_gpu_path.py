"""The GPU path, checked on CPU: a CPU run on a GPU host never touches CUDA.

`train.device=cpu` on a machine with GPUs must not open a CUDA context (every rank would open one
on GPU 0): no CUDA generator, RNG swap, event, pinned buffer or memory query. The test pretends
to be a GPU host (`torch.cuda.is_available()` says True) and makes every CUDA entry point, and
CUDA's lazy initialisation behind them, raise; a short training run with dropout, full
recompute, the timeline, the memory meter, a checkpoint, a resume and the end-of-run sample must
still finish.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from nanomt.parallel.pipeline.timeline import Timeline
from nanomt.parallel.random import TensorParallelRNG
from nanomt.testing import compose_config

# torch.manual_seed's call of torch.cuda.manual_seed_all is queued until CUDA initialises
# (torch.cuda._lazy_call): allowed; the initialisation itself (_lazy_init) is not.
CUDA_ENTRY_POINTS = ("_lazy_init", "init", "current_device", "set_device", "device_count",
                     "Event", "Stream", "current_stream", "synchronize", "get_rng_state",
                     "set_rng_state",
                     "get_rng_state_all", "set_rng_state_all", "max_memory_allocated",
                     "memory_allocated", "reset_peak_memory_stats", "memory_reserved",
                     "mem_get_info", "empty_cache", "get_device_name",
                     "get_device_properties", "get_device_capability")


@pytest.fixture
def gpu_host_that_must_not_be_touched(monkeypatch) -> list[str]:
    """torch.cuda says a GPU is there; any use of it raises (and is listed)."""
    calls: list[str] = []

    def forbidden(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"torch.cuda.{name} called under train.device=cpu")
        return call

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in CUDA_ENTRY_POINTS:
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    real_generator = torch.Generator

    class Generator(real_generator):  # torch.Generator(device="cuda") initialises CUDA
        def __new__(cls, device="cpu"):
            if torch.device(device).type == "cuda":
                forbidden("Generator(device='cuda')")()
            return real_generator(device)

    monkeypatch.setattr(torch, "Generator", Generator)
    # Pinned memory needs CUDA's host allocator: a CPU-only torch refuses it outright, and a
    # CUDA build initialises CUDA for it (through _lazy_init, forbidden above).
    return calls


def tiny_cpu_run(root, steps: int, resume: str = "none") -> dict:
    from nanomt.train import run

    (root / "text.txt").write_text("\n\n".join(["to be or not to be, that is the question."] * 60))
    cfg = compose_config([
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=16",
        "model.dropout=0.1", "train.device=cpu", "train.global_batch_size=4",
        "train.micro_batch_size=2", f"train.steps={steps}", "train.eval_interval=0",
        "train.eval_batches=1", "train.progress_bar=false", "train.measure_memory=true",
        "train.timeline=true", "train.activation_checkpointing=full", "train.sample=true",
        "train.sample_tokens=4", f"train.resume={resume}", "checkpoint.interval=2",
        "logging.wandb.mode=disabled", f"data.name={root / 'text.txt'}",
        f"data.cache_dir={root / 'cache'}", f"checkpoint.dir={root / 'ckpt'}"])
    with contextlib.redirect_stdout(io.StringIO()):
        return run(cfg, root / "run")


def test_a_cpu_run_on_a_gpu_host_never_touches_cuda(gpu_host_that_must_not_be_touched,
                                                    tmp_path):
    first = tiny_cpu_run(tmp_path, steps=2)
    resumed = tiny_cpu_run(tmp_path, steps=3, resume="auto")
    assert gpu_host_that_must_not_be_touched == []
    assert first["steps"] == 2 and resumed["steps"] == 3
    assert (tmp_path / "run" / "timeline" / "rank0.json").exists()


def test_the_dropout_tracker_forks_only_the_cpu_stream_until_cuda_is_in_use(
        gpu_host_that_must_not_be_touched):
    rng = TensorParallelRNG(seed=1, tp_rank=0)
    outer = torch.get_rng_state()
    with rng.fork():
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer)  # the default stream is back
    assert list(rng.state_dict()) == ["cpu"]
    again = TensorParallelRNG(seed=1, tp_rank=0)
    with again.fork():
        assert torch.equal(torch.rand(3), inside)  # the same seed draws the same masks
    assert gpu_host_that_must_not_be_touched == []


def test_the_timeline_reads_the_host_clock_until_cuda_is_in_use(
        gpu_host_that_must_not_be_touched):
    timeline = Timeline({"rank": 0})
    timeline.begin_step(1)
    with timeline.span("F", 0, 0):
        pass
    timeline.end_step()
    assert timeline.cuda_events is False and len(timeline.events) == 1
    assert gpu_host_that_must_not_be_touched == []


# ---- the multi-rank tests' backend (pytest --backend nccl, tests/conftest.py) --------------------
def _backend_of_my_world() -> str:
    import torch.distributed as dist

    return dist.get_backend()


def test_the_ranks_speak_the_backend_pytest_was_given(monkeypatch):
    from nanomt.testing import TEST_BACKEND_ENV, compose_config as test_config, run_distributed

    monkeypatch.setenv(TEST_BACKEND_ENV, "gloo")  # the default: CPU, CI
    assert run_distributed(_backend_of_my_world, world_size=2) == ["gloo", "gloo"]
    assert test_config([]).train.tf32 is True
    monkeypatch.setenv(TEST_BACKEND_ENV, "nccl")  # one GPU per rank, fp32 compared without TF32
    assert test_config([]).train.tf32 is False
    with pytest.raises(pytest.skip.Exception, match="2 ranks need 2 GPUs"):
        run_distributed(_backend_of_my_world, world_size=2)
