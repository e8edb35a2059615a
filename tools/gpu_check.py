"""One prepared command for the first GPU at hand: does nanomt's CUDA/NCCL path hold?

    python tools/gpu_check.py                        # one H100/H200: at most about 8 minutes
    python tools/gpu_check.py --device cpu --quick   # every part that can run on a CPU, tiny (CI)

Each part ends pass, fail or skipped (with the reason); a part that fails does not stop the
others. The results go to gpu_check.json (--out), with the device, versions and commit, and a
table is printed.

  versions           torch, CUDA, cuDNN, NCCL, the device, the commit
  collectives        the NCCL API at world size 1 with device_id bound: in-place all-gather and
                     reduce-scatter, batch_isend_irecv, object collectives, a float64 MAX
                     all-reduce (gloo on CPU: it cannot send to itself, so no p2p there)
  train_smoke        nanomt.train.run on a widened tiny model in bf16: ZeRO 0 with the timeline,
                     the memory meter and the end-of-run sample; ZeRO 3 with full recompute;
                     one fp16 run (fp32 instead of bf16 on CPU)
  resume             save after step 2, resume: the later steps bitwise equal to an unbroken run
                     (deterministic algorithms on)
  cpu_vs_cuda        fp32 with TF32 off, 5 steps: CPU and CUDA losses within 1e-4
  recompute_dropout  dropout on: recompute none and full give equal gradients (the dropout RNG
                     tracker replays the same masks)
  one_sync_step      a step waits for the device once (its read): syncs counted under
                     torch.cuda.set_sync_debug_mode("warn") (on CPU: run, nothing to detect)
  mfu                tools/bench/gpu_mfu.py: gpt_125m, gpt_350m, gpt_1_3b against plain PyTorch,
                     each step split into forward, backward and optimizer
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools" / "bench")]

import gpu_mfu  # noqa: E402

from nanomt.config import compose_config  # noqa: E402


class Skipped(Exception):
    """A part that cannot run here; its message is the reason."""


@dataclass
class Check:
    """Where and how big: the device, the sizes (tiny with --quick) and a scratch folder."""

    device: torch.device
    quick: bool
    work: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def train_overrides(self, name: str, steps: int, extra: list[str]) -> list[str]:
        """A widened tiny model (on CPU a tiny one) trained `steps` steps from a made-up text."""
        h, heads, layers, seq, batch, micro = ((32, 2, 2, 32, 4, 2) if self.quick
                                               else (512, 8, 4, 256, 16, 4))
        text = self.work / "text.txt"
        if not text.exists():
            line = "the quick brown fox jumps over the lazy dog, then sleeps in the sun."
            text.write_text("\n\n".join(f"{i}: {line * 4}" for i in range(400)))
        return [f"model.num_layers={layers}", f"model.hidden_size={h}",
                f"model.num_heads={heads}", f"model.seq_len={seq}",
                f"train.device={self.device.type}", f"train.global_batch_size={batch}",
                f"train.micro_batch_size={micro}", f"train.steps={steps}",
                "train.eval_interval=0", "train.eval_batches=1", "train.progress_bar=false",
                "train.sample=false", "optim.warmup_steps=1", "checkpoint.interval=0",
                "logging.wandb.mode=disabled", f"data.name={text}",
                f"data.cache_dir={self.work / 'cache'}",
                f"checkpoint.dir={self.work / name / 'ckpt'}"] + extra

    @property
    def half(self) -> str:
        return "bf16" if self.cuda else "fp32"  # CPUs without bf16 units: fp32


def train(check: Check, name: str, steps: int, extra: list[str]) -> tuple[dict, list, str]:
    """nanomt.train.run; returns (summary, metrics records, what it printed)."""
    from nanomt.train import run

    cfg = compose_config(check.train_overrides(name, steps, extra))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = run(cfg, check.work / name / "run")
    lines = (check.work / name / "run" / "metrics.jsonl").read_text().splitlines()
    return summary, [json.loads(line) for line in lines], printed.getvalue()


# ---- the parts ---------------------------------------------------------------------------------
def part_versions(check: Check) -> str:
    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "commit": gpu_mfu.commit_of(ROOT)}
    if check.cuda:
        props = torch.cuda.get_device_properties(check.device)
        facts.update(device=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gb=round(props.total_memory / 2**30, 1),
                     cudnn=torch.backends.cudnn.version(),
                     nccl=".".join(map(str, torch.cuda.nccl.version())))
    else:
        facts["device"] = "cpu"
    return ", ".join(f"{k} {v}" for k, v in facts.items())


def part_collectives(check: Check) -> str:
    """The collectives nanomt issues, at world size 1 with device_id bound (on NCCL a real
    communicator: argument checks, dtypes and in-place aliasing all go through it)."""
    kwargs = {"device_id": check.device} if check.cuda else {}
    dist.init_process_group("nccl" if check.cuda else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60), **kwargs)
    done = []
    try:
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        full = torch.arange(8.0, device=check.device)
        gather(full, full[0:8])  # my shard is my slot of the output
        scatter(full[0:8], full)  # my slot of the input is the output
        assert full.tolist() == list(map(float, range(8)))
        done.append("in-place all-gather and reduce-scatter")
        peak = torch.tensor([1.5, -2.0], dtype=torch.float64, device=check.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        assert peak.tolist() == [1.5, -2.0]
        done.append("float64 MAX all-reduce")
        box, everyone = [{"step": 3}], [None]
        dist.broadcast_object_list(box, src=0)
        dist.all_gather_object(everyone, "rank 0")
        assert box == [{"step": 3}] and everyone == ["rank 0"]
        done.append("object collectives")
        if check.cuda:
            received = torch.zeros_like(full)
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, full, 0),
                                            dist.P2POp(dist.irecv, received, 0)])
            for work in works:
                work.wait()
            assert torch.equal(received, full)
            done.append("batch_isend_irecv")
        else:
            done.append("no batch_isend_irecv (gloo cannot send to itself)")
    finally:
        dist.destroy_process_group()
    return "; ".join(done)


def part_train_smoke(check: Check) -> str:
    runs = {"zero0": [f"train.precision={check.half}", "parallel.zero_stage=0",
                      "train.timeline=true", "train.measure_memory=true", "train.sample=true",
                      "train.sample_tokens=8", "train.sample_prompt=the"],
            "zero3_full_recompute": [f"train.precision={check.half}", "parallel.zero_stage=3",
                                     "train.activation_checkpointing=full"],
            "fp16": ["train.precision=fp16"]}
    notes, steps = [], 2 if check.quick else 3
    for name, extra in runs.items():
        summary, records, printed = train(check, name, steps, extra)
        assert summary["steps"] == steps and all(map(_finite, (r["loss"] for r in records))), name
        if name == "zero0":
            assert (check.work / name / "run" / "timeline" / "rank0.json").exists()
            assert summary["memory_per_rank"][0]["peak_activations"] > 0
            sample = printed.split("nanomt sample:\n", 1)[-1]
            assert "nanomt sample:" in printed and sample.startswith("the"), "no sample"
        notes.append(f"{name} loss {records[-1]['loss']:.3f}")
    return "; ".join(notes)


def part_resume(check: Check) -> str:
    steps = 3 if check.quick else 4
    with deterministic(check):
        _, unbroken, _ = train(check, "unbroken", steps, ["checkpoint.interval=2"])
        train(check, "resumed", steps, ["checkpoint.interval=2", "train.exit_after=2"])
        _, resumed, _ = train(check, "resumed", steps, ["checkpoint.interval=2",
                                                        "train.resume=auto"])
    keys = ("step", "loss", "grad_norm")
    after = [[r[k] for k in keys] for r in unbroken if r["step"] > 2]
    again = [[r[k] for k in keys] for r in resumed if r["step"] > 2]
    assert after == again, f"unbroken {after} != resumed {again}"
    assert len(again) == steps - 2
    return f"after the resume, (step, loss, grad norm) bitwise equal: {again}"


def part_cpu_vs_cuda(check: Check) -> str:
    if not check.cuda:
        raise Skipped("needs CUDA")
    losses = {}
    for device in ("cpu", "cuda"):
        on = Check(torch.device(device), check.quick, check.work)
        _, records, _ = train(on, f"fp32_{device}", 5, ["train.precision=fp32", "train.tf32=false"])
        losses[device] = [r["loss"] for r in records]
    worst = max(abs(a - b) for a, b in zip(losses["cpu"], losses["cuda"]))
    assert worst < 1e-4, f"CPU {losses['cpu']} vs CUDA {losses['cuda']}"
    return f"5 steps, largest loss difference {worst:.2e}"


def part_recompute_dropout(check: Check) -> str:
    from nanomt.model import GPT, ModelConfig
    from nanomt.model.checkpointing import set_activation_checkpointing

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, seq_len=64, vocab_size=256,
                      dropout=0.1)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in ("none", "full"):
        model = GPT(cfg, None, seed=7).to(check.device)
        set_activation_checkpointing(model, mode)
        torch.manual_seed(11)  # the same default streams (CPU and every GPU) for both modes
        batch = tokens.to(check.device)
        model(batch, batch).backward()
        grads[mode] = [p.grad.float() for p in model.parameters()]
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                for a, b in zip(grads["none"], grads["full"]))
    assert worst <= 1e-5, f"relative gradient difference {worst:.2e}: the masks differ"
    return f"largest relative gradient difference {worst:.1e}"


def part_one_sync_step(check: Check) -> str:
    """A step's host syncs, counted by CUDA's sync debug mode: exactly one, the step's read of
    its loss, norm and verdict (nanomt.step_read.read_step)."""
    import warnings

    from nanomt.memory import PeakMemoryMeter
    from nanomt.trainer import setup

    cfg = compose_config(check.train_overrides("one_sync", 10, [
        f"train.precision={check.half}", "logging.metrics_interval=5"]))
    trainer = setup(cfg, check.work / "one_sync" / "run")
    meter = PeakMemoryMeter()
    assert trainer.train_step(0, meter) is None  # warm-up: a step that writes no record
    if not check.cuda:
        assert trainer.train_step(1, meter) is None
        return "ran; a CPU has no host sync to detect"
    torch.cuda.synchronize(check.device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert trainer.train_step(1, meter) is None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, f"{len(syncs)} host syncs in one step (expected 1): {syncs[:3]}"
    return "step 2 made exactly one host sync (its read)"


def part_mfu(check: Check) -> str:
    models = ["tiny"] if check.quick else ["gpt_125m", "gpt_350m", "gpt_1_3b"]
    argv = ["--device", check.device.type, "--steps", "1" if check.quick else "10",
            "--out", str(check.work / "gpu_mfu.json"), "--models", *models]
    if check.quick:
        argv += ["--set", "model.num_layers=1", "model.hidden_size=32", "model.seq_len=32"]
    with contextlib.redirect_stdout(io.StringIO()):
        results = gpu_mfu.main(argv)
    check_results["mfu_table"] = gpu_mfu.markdown(results)
    check_results["mfu"] = results
    return gpu_mfu.markdown(results).splitlines()[-1]


PARTS = {"versions": part_versions, "collectives": part_collectives,
         "train_smoke": part_train_smoke, "resume": part_resume, "cpu_vs_cuda": part_cpu_vs_cuda,
         "recompute_dropout": part_recompute_dropout, "one_sync_step": part_one_sync_step,
         "mfu": part_mfu}
check_results: dict = {}  # what a part leaves beside its line (the MFU table)


# ---- running them ------------------------------------------------------------------------------
def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


@contextlib.contextmanager
def deterministic(check: Check):
    """Deterministic kernels (flash attention's backward otherwise adds with atomics)."""
    if not check.cuda:
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def run_part(name: str, check: Check) -> dict:
    start = time.perf_counter()
    try:
        result = {"status": "pass", "detail": PARTS[name](check)}
    except Skipped as reason:
        result = {"status": "skipped", "detail": str(reason)}
    except Exception as error:  # noqa: BLE001 - one part's failure must not stop the others
        result = {"status": "fail", "detail": f"{type(error).__name__}: {error}"[:500],
                  "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI, CPU)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here; --device cpu --quick checks the CPU")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    check_results.clear()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        check = Check(device, args.quick, Path(work))
        parts = {}
        for name in args.parts:
            parts[name] = run_part(name, check)
            print(f"{name:18} {parts[name]['status']:8} {parts[name]['seconds']:6.1f} s  "
                  f"{parts[name]['detail'].splitlines()[0][:100]}", flush=True)
    report = {"device": args.device, "quick": args.quick, "commit": gpu_mfu.commit_of(ROOT),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "parts": parts,
              **check_results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if "mfu_table" in check_results:
        print(check_results["mfu_table"])
    failed = [name for name, part in parts.items() if part["status"] == "fail"]
    print(f"gpu_check: {len(parts) - len(failed)} of {len(parts)} parts did not fail"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
