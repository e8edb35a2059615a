"""Benchmark (not a test; needs one CUDA GPU): tokens/s, TFLOP/s and MFU of nanomt on one GPU.

    python tools/bench/gpu_mfu.py [--steps 10] [--models gpt_125m gpt_350m gpt_1_3b]

For each model config (conf/model/*.yaml) it trains nanomt's GPT in bf16 (fp32 master weights
and gradients, ShardedAdamW with the fused multi-tensor update, flash SDPA, TF32 on) and a plain
PyTorch GPT of the same shape (plain_gpt.PlainGPT in bf16 autocast with
torch.optim.AdamW(fused=True)), a few warm-up steps and then `--steps` timed ones each. A step
is MICRO_BATCHES micro-batches of MICRO_BATCH[model] sequences and one optimizer update, as in a
real run (one micro-batch per step would overweight the optimizer). CUDA events split nanomt's
step into forward, backward and optimizer (no sync inside the step). MFU is the model's matmul
FLOPs (nanomt.flops.flops_per_iteration, Narayanan et al. 2021) per second over the card's
dense bf16 peak (nanomt.flops.peak_tflops; --peak-tflops to give another; null if unknown).

Every (model, implementation) runs in a fresh process: nothing one leaves on the GPU (nanomt's
gradient hooks hold the model in a reference cycle) can weigh on the next. Budget: about 8
minutes on an H100/H200 with the defaults. Prints a markdown table and writes gpu_mfu.json
with the commit. `--device cpu` runs the same code on the CPU in fp32 (tools/gpu_check.py
--quick: the script cannot rot unseen).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from plain_gpt import PlainGPT  # noqa: E402

from nanomt.config import compose_config, model_config  # noqa: E402
from nanomt.flops import flops_per_iteration, peak_tflops  # noqa: E402
from nanomt.model import GPT  # noqa: E402

MICRO_BATCH = {"gpt_125m": 16, "gpt_350m": 8, "gpt_1_3b": 4}  # sequences per micro-batch
MICRO_BATCHES = 4  # per optimizer step


class Phases:
    """Time spent in each phase of a step, from CUDA events (read once, after the last step);
    on the CPU, host clock reads."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def run(self, phase: str, work):
        start = self._now()
        result = work()
        self.marks.append((phase, start, self._now()))
        return result

    def seconds(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for phase, start, end in self.marks:
            took = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            totals[phase] = totals.get(phase, 0.0) + took
        return totals


def nanomt_step(cfg, model_cfg, micro_batches: list, device: torch.device, phases: Phases):
    from nanomt.optim import build_optimizer

    model = GPT(model_cfg, None, seed=1).to(device)
    optimizer = build_optimizer([model], cfg, None, num_microbatches=len(micro_batches))

    def step():
        optimizer.zero_grad()
        for batch in micro_batches:
            loss = phases.run("forward", lambda: model(*batch) / len(micro_batches))
            phases.run("backward", loss.backward)
        phases.run("optimizer", optimizer.step)
    return step


def plain_step(model_cfg, micro_batches: list, device: torch.device, phases: Phases):
    model = PlainGPT(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    bf16 = device.type == "cuda"

    def forward(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(*batch) / len(micro_batches)

    def update():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def step():
        optimizer.zero_grad(set_to_none=True)
        for batch in micro_batches:
            loss = phases.run("forward", lambda: forward(batch))
            phases.run("backward", loss.backward)
        phases.run("optimizer", update)
    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_one(name: str, who: str, steps: int, device: torch.device,
                overrides: list[str]) -> dict:
    """One implementation on one model config: warm-up, then `steps` timed steps."""
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = compose_config([f"model={name}", f"train.precision={precision}", *overrides])
    model_cfg = model_config(cfg)
    b = MICRO_BATCH.get(name, 2)
    micro_batches = []
    for _ in range(MICRO_BATCHES):
        tokens = torch.randint(0, model_cfg.vocab_size, (b, model_cfg.seq_len), device=device)
        micro_batches.append((tokens, tokens))
    phases = Phases(device)
    build = nanomt_step if who == "nanomt" else plain_step
    step = (build(cfg, model_cfg, micro_batches, device, phases) if who == "nanomt"
            else build(model_cfg, micro_batches, device, phases))
    for _ in range(min(2, steps)):  # warm-up: kernels chosen, buffers allocated
        step()
    synchronize(device)
    phases.marks.clear()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    sequences = b * MICRO_BATCHES
    phase_s = {phase: total / steps for phase, total in phases.seconds().items()}
    return {"micro_batch": b, "micro_batches": MICRO_BATCHES, "seq_len": model_cfg.seq_len,
            "step_s": seconds, "tokens_per_s": sequences * model_cfg.seq_len / seconds,
            "model_flops": flops_per_iteration(model_cfg, sequences), "phase_s": phase_s,
            "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                               if device.type == "cuda" else None)}


def measure_in_fresh_process(name: str, who: str, steps: int, device: str,
                             overrides: list[str]) -> dict:
    """measure_one in a child process, so that everything it allocated is gone afterwards."""
    done = subprocess.run([sys.executable, __file__, "--one", name, who, "--steps", str(steps),
                           "--device", device, "--set", *overrides], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{who} {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def commit_of(root: Path) -> str:
    """The checkout's commit, or "unknown" where git or the repository is missing."""
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True)
    except FileNotFoundError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def run_table(models: list[str], steps: int, device: str, peak: float | None,
              overrides: list[str]) -> dict:
    """Every model, nanomt and plain, each in a fresh process; adds TFLOP/s, MFU, shares."""
    table = {}
    for name in models:
        row = {}
        for who in ("nanomt", "plain"):
            r = measure_in_fresh_process(name, who, steps, device, overrides)
            r["tflops"] = r["model_flops"] / r["step_s"] / 1e12
            r["mfu"] = r["tflops"] / peak if peak else None
            total = sum(r["phase_s"].values())
            r["phase_share"] = {phase: s / total for phase, s in r["phase_s"].items()}
            row[who] = r
        table[name] = row
    return table


def markdown(results: dict) -> str:
    def mfu(r):
        return "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    lines = [f"{results['device']}, commit {results['commit']}, dense bf16 peak "
             f"{results['peak_bf16_tflops']} TFLOP/s",
             "| model | nanomt tokens/s | TFLOP/s | MFU | optimizer share | plain tokens/s | "
             "TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        ours, plain = r["nanomt"], r["plain"]
        lines.append(f"| {name} | {ours['tokens_per_s']:,.0f} | {ours['tflops']:.1f} | "
                     f"{mfu(ours)} | {ours['phase_share']['optimizer']:.1%} | "
                     f"{plain['tokens_per_s']:,.0f} | {plain['tflops']:.1f} | {mfu(plain)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["gpt_125m", "gpt_350m", "gpt_1_3b"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default="gpu_mfu.json")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every model (e.g. model.seq_len=32)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "WHO"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_mfu.py needs a CUDA GPU (or --device cpu for a dry run)")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.one:  # the child process of measure_in_fresh_process
        print(json.dumps(measure_one(*args.one, args.steps, torch.device(args.device), args.set)))
        return {}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = peak_tflops(device_name, args.peak_tflops, "bf16")
    results = {"device": device_name, "peak_bf16_tflops": peak, "commit": commit_of(ROOT),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "micro_batches_per_step": MICRO_BATCHES,
               "overrides": args.set,
               "models": run_table(args.models, args.steps, args.device, peak, args.set)}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
