"""Benchmark (not a test; needs one CUDA GPU): tokens/s, TFLOP/s and MFU of nanomt on one GPU.

    python tools/bench/gpu_mfu.py [--steps 10] [--models gpt_125m gpt_350m gpt_1_3b]

For each model config (conf/model/*.yaml) it trains nanomt's GPT in bf16 (fp32 master weights
and gradients, ShardedAdamW with the fused multi-tensor update, flash SDPA, TF32 on) and, in the
same run, a plain PyTorch GPT of the same shape (plain_gpt.PlainGPT in bf16 autocast with
torch.optim.AdamW(fused=True)), a few warm-up steps and then `--steps` timed ones each. MFU is
the model's matmul FLOPs (nanomt.flops.flops_per_iteration, Narayanan et al. 2021) per second
over the card's dense bf16 peak (PEAK_BF16 by device name; --peak-tflops to give another).
Budget: about 8 minutes on an H100/H200 with the defaults. Prints a markdown table and writes
gpu_mfu.json with the commit.
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
from nanomt.flops import flops_per_iteration  # noqa: E402
from nanomt.model import GPT  # noqa: E402

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
MICRO_BATCH = {"gpt_125m": 16, "gpt_350m": 8, "gpt_1_3b": 4}


def peak_flops(override_tflops: float | None) -> float:
    if override_tflops:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (its dense bf16 peak)")


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def nanomt_step(cfg, model_cfg, batch):
    from nanomt.optim import build_optimizer

    model = GPT(model_cfg, None, seed=1).cuda()
    optimizer = build_optimizer([model], cfg, None, num_microbatches=1)  # casts to bf16

    def step():
        optimizer.zero_grad()
        model(*batch).backward()
        optimizer.step()
    return step, model


def plain_step(model_cfg, batch):
    model = PlainGPT(model_cfg).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step, model


def measure(name: str, args, peak: float) -> dict:
    cfg = compose_config([f"model={name}", "train.precision=bf16"])
    model_cfg = model_config(cfg)
    b = MICRO_BATCH.get(name, 4)
    tokens = torch.randint(0, model_cfg.vocab_size, (b, model_cfg.seq_len), device="cuda")
    batch = (tokens, tokens)
    flops = flops_per_iteration(model_cfg, b)
    out = {"micro_batch": b, "seq_len": model_cfg.seq_len}
    for who in ("nanomt", "plain"):
        step, model = (nanomt_step(cfg, model_cfg, batch) if who == "nanomt"
                       else plain_step(model_cfg, batch))
        seconds = time_steps(step, 3, args.steps)
        out[who] = {"step_s": seconds, "tokens_per_s": b * model_cfg.seq_len / seconds,
                    "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak}
        del step, model
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["gpt_125m", "gpt_350m", "gpt_1_3b"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", default="gpu_mfu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_mfu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(args.peak_tflops)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    results = {"device": torch.cuda.get_device_name(), "peak_bf16_tflops": peak / 1e12,
               "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "models": {name: measure(name, args, peak) for name in args.models}}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['device']}, commit {commit}, dense bf16 peak {peak / 1e12:.0f} TFLOP/s")
    print("| model | nanomt tokens/s | TFLOP/s | MFU | plain tokens/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["models"].items():
        ours, plain = r["nanomt"], r["plain"]
        print(f"| {name} | {ours['tokens_per_s']:,.0f} | {ours['tflops']:.0f} | {ours['mfu']:.1%} "
              f"| {plain['tokens_per_s']:,.0f} | {plain['tflops']:.0f} | {plain['mfu']:.1%} |")


if __name__ == "__main__":
    main()
