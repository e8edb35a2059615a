"""Benchmark: context parallelism against the same model at cp=1, and the ring's overlap.

    python tools/bench/bench_context_parallel.py [--cp 2] [--seq-len 1024] [--repeats 5]

One forward + backward of a small GPT over a batch of long sequences: on one process (cp=1),
then on `--cp` gloo ranks that each hold 1/cp of every sequence. Prints both medians, their
ratio (the ideal is 1/cp on cp idle cores) and, from one instrumented step, how much of each
rank's ring time was spent waiting for a key/value message that had not arrived yet: the part
the overlap failed to hide. `--timeline PNG` draws that step (compute blocks and messages in
flight per rank) with matplotlib.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nanomt.model import GPT, ModelConfig
from nanomt.parallel import context_parallel
from nanomt.parallel.context_parallel import split_sequence
from nanomt.parallel.grid import ParallelGrid
from nanomt.testing import run_distributed


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                       seq_len=args.seq_len, vocab_size=512, dropout=0.0)


def step_times(cfg: ModelConfig, grid: ParallelGrid | None, repeats: int) -> list[float]:
    torch.manual_seed(0)
    model = GPT(cfg, grid)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    if grid is not None:
        tokens = split_sequence(tokens, 1, grid.cp_rank, grid.cp_size)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        model(tokens, tokens).backward()
        times.append(time.perf_counter() - t0)
    return times[1:]


def traced_step(cfg: ModelConfig, grid: ParallelGrid) -> list[tuple[str, float, float]]:
    """(kind, start, end) of every block computation and ring wait of one step, by patching
    the ring's methods in this benchmark process only."""
    events, origin = [], time.perf_counter()
    ring, cp = context_parallel._Ring, context_parallel
    original_wait, original_shift = ring.wait, ring.shift
    block, block_backward = cp.attention_block, cp.attention_block_backward

    def timed(kind, fn):
        def wrapper(*a, **k):
            start = time.perf_counter() - origin
            out = fn(*a, **k)
            events.append((kind, start, time.perf_counter() - origin))
            return out
        return wrapper

    ring.wait, ring.shift = timed("wait", original_wait), timed("post", original_shift)
    cp.attention_block = timed("block", block)
    cp.attention_block_backward = timed("block", block_backward)
    try:
        step_times(cfg, grid, repeats=0)
        events.clear()
        origin = time.perf_counter()
        step_times(cfg, grid, repeats=0)
    finally:
        ring.wait, ring.shift = original_wait, original_shift
        cp.attention_block, cp.attention_block_backward = block, block_backward
    return events


def _context_parallel_worker(cfg: ModelConfig, cp: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    grid = ParallelGrid(cp=cp)
    return {"times": step_times(cfg, grid, repeats), "events": traced_step(cfg, grid)}


def draw(events_by_rank: list[list], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"block": "tab:blue", "wait": "tab:red", "post": "tab:green"}
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(events_by_rank)))
    for rank, events in enumerate(events_by_rank):
        for kind, start, end in events:
            ax.barh(rank, max(end - start, 1e-4), left=start, color=colours[kind], height=0.6)
    ax.set_yticks(range(len(events_by_rank)), [f"cp rank {r}" for r in range(len(events_by_rank))])
    ax.set_xlabel("seconds into the step (blue: attention block, green: post messages, "
                  "red: wait for messages)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeline", default=None, help="write the traced step as a PNG")
    parser.add_argument("--json", default=None, help="write the results as JSON")
    args = parser.parse_args()
    cfg = model_config(args)

    torch.set_num_threads(1)
    single = statistics.median(step_times(cfg, None, args.repeats))
    ranks = run_distributed(_context_parallel_worker, world_size=args.cp,
                            args=(cfg, args.cp, args.repeats), timeout_s=900)
    parallel = statistics.median(max(times) for times in zip(*(r["times"] for r in ranks)))
    waited = [sum(e - s for kind, s, e in r["events"] if kind == "wait") for r in ranks]
    computed = [sum(e - s for kind, s, e in r["events"] if kind == "block") for r in ranks]
    result = {"seq_len": args.seq_len, "cp": args.cp, "cp1_step_s": single,
              "cp_step_s": parallel, "ratio": parallel / single,
              "ring_wait_s": waited, "ring_block_s": computed}
    print(f"| seq {args.seq_len} | cp=1 {single * 1e3:.1f} ms | cp={args.cp} "
          f"{parallel * 1e3:.1f} ms | ratio {parallel / single:.2f} (ideal {1 / args.cp:.2f}) |")
    for rank, (w, c) in enumerate(zip(waited, computed)):
        print(f"  cp rank {rank}: attention blocks {c * 1e3:.1f} ms, waiting for the ring "
              f"{w * 1e3:.1f} ms")
    if args.timeline:
        draw([r["events"] for r in ranks], args.timeline)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
