"""Draw a run's pipeline timeline: a PNG (one row per rank) and a Chrome trace, plus the bubble.

    torchrun --standalone --nproc_per_node=4 -m nanomt.train parallel.pp=2 parallel.tp=2 \
        parallel.virtual_stages=2 train.timeline=true
    python tools/pipeline_timeline.py outputs/<date>/<time>            # the last step
    python tools/pipeline_timeline.py outputs/<date>/<time> --step 5

Writes <run>/timeline/timeline.png and <run>/timeline/trace.json (open it in chrome://tracing or
https://ui.perfetto.dev) and prints the measured bubble, idle time / busy time averaged over
ranks, next to the schedule's formula (SCHEDULE_FORMULAS: F, and for the zero-bubble schedules
B = W, of equal length; ZB-V's is its order's, replayed, tests/test_zero_bubble.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanomt.parallel.pipeline.timeline import bubble_fraction, load_timelines  # noqa: E402

FORWARD_COLOURS = ["#4C72B0", "#8FB0DE", "#2E4A7A", "#B9CCEB"]
BACKWARD_COLOURS = ["#DD8452", "#F2B58C", "#A3532A", "#F7D2B8"]
WEIGHT_COLOURS = ["#55A868", "#9CD3A8", "#2F6B3D", "#C8E8CF"]  # ZB-H1's W passes
COLOURS = {"F": FORWARD_COLOURS, "B": BACKWARD_COLOURS, "W": WEIGHT_COLOURS}
SCHEDULE_FORMULAS = {  # schedule: (its name, the bubble's formula, the formula of p, v, m)
    "1f1b": ("1F1B", "(p-1)/m", lambda p, v, m: (p - 1) / m),
    "gpipe": ("GPipe", "(p-1)/m", lambda p, v, m: (p - 1) / m),
    "interleaved": ("interleaved 1F1B", "(p-1)/(v*m)", lambda p, v, m: (p - 1) / (v * m)),
    "zb_h1": ("ZB-H1", "(p-1)/(3m)", lambda p, v, m: (p - 1) / (3 * m)),
    "zbv": ("ZB-V", "(p-1)/(6m)", lambda p, v, m: (p - 1) / (6 * m)),
}


def step_events(timelines: list[dict], step: int | None) -> tuple[int, list[list[list]]]:
    """The events of `step` (default: the last recorded) on every rank."""
    steps = [s["step"] for s in timelines[0]["steps"]]
    if not steps:
        raise SystemExit("the timeline holds no steps")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise SystemExit(f"step {chosen} not recorded; steps {steps[0]}..{steps[-1]}")
    per_rank = []
    for timeline in timelines:
        by_step = {s["step"]: s["events"] for s in timeline["steps"]}
        per_rank.append(by_step[chosen])
    return chosen, per_rank


def label(timeline: dict) -> str:
    return (f"rank {timeline['rank']} (pp {timeline['pp_rank']}, tp {timeline['tp_rank']}, "
            f"dp {timeline['dp_rank']})")


def draw_png(timelines: list[dict], events: list[list[list]], step: int, title: str,
             path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = min(e[3] for rank_events in events for e in rank_events)
    fig, ax = plt.subplots(figsize=(14, 0.6 * len(events) + 1.6))
    for row, rank_events in enumerate(events):
        y = len(events) - 1 - row
        for kind, mb, chunk, start, end in rank_events:
            x, width = (start - t0) * 1e3, (end - start) * 1e3
            if kind == "wait":
                ax.broken_barh([(x, width)], (y - 0.1, 0.2), facecolors="#D0D0D0")
                continue
            ax.broken_barh([(x, width)], (y - 0.4, 0.8), facecolors=COLOURS[kind][chunk % 4],
                           edgecolors="black", linewidth=0.4)
            ax.text(x + width / 2, y, str(mb), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(events)))
    ax.set_yticklabels([label(t) for t in reversed(timelines)])
    ax.set_xlabel("time in the step (ms)")
    ax.set_title(title)
    v = timelines[0]["virtual_stages"]
    handles = [Patch(color=FORWARD_COLOURS[c], label=f"forward, chunk {c}") for c in range(v)]
    handles += [Patch(color=BACKWARD_COLOURS[c], label=f"backward, chunk {c}") for c in range(v)]
    if any(e[0] == "W" for rank_events in events for e in rank_events):
        handles.append(Patch(color=WEIGHT_COLOURS[0], label="weight gradients (W)"))
    handles.append(Patch(color="#D0D0D0", label="waiting for a neighbour"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(handles),
              fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def chrome_trace(timelines: list[dict], events: list[list[list]]) -> dict:
    """Chrome trace-event JSON: one thread per rank, one complete ("X") event per pass or wait."""
    t0 = min(e[3] for rank_events in events for e in rank_events)
    trace = []
    for timeline, rank_events in zip(timelines, events):
        tid = timeline["rank"]
        trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid,
                      "args": {"name": label(timeline)}})
        for kind, mb, chunk, start, end in rank_events:
            name = "wait" if kind == "wait" else f"{kind}{mb}" + (f".{chunk}" if chunk else "")
            trace.append({"name": name, "cat": kind, "ph": "X", "pid": 0, "tid": tid,
                          "ts": (start - t0) * 1e6, "dur": (end - start) * 1e6,
                          "args": {"microbatch": mb, "chunk": chunk}})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder with a timeline/ inside")
    parser.add_argument("--step", type=int, default=None, help="step to draw (default: last)")
    args = parser.parse_args(argv)
    folder = args.run_dir / "timeline"
    timelines = load_timelines(folder)
    step, events = step_events(timelines, args.step)
    pp, v = timelines[0]["pp"], timelines[0]["virtual_stages"]
    m = timelines[0]["num_microbatches"]
    schedule = timelines[0].get("schedule", "1f1b")
    if schedule == "1f1b" and v > 1:
        schedule = "interleaved"
    schedule, formula, theory_of = SCHEDULE_FORMULAS[schedule]
    theory = theory_of(pp, v, m)
    idle_over_busy, idle_over_span = bubble_fraction(events)
    title = (f"step {step}: p={pp}, v={v}, m={m} ({schedule}); bubble measured "
             f"{idle_over_busy:.3f} vs {formula} = {theory:.3f}")
    draw_png(timelines, events, step, title, folder / "timeline.png")
    (folder / "trace.json").write_text(json.dumps(chrome_trace(timelines, events)))
    print(f"step {step}, {len(timelines)} ranks, p={pp} v={v} m={m}")
    print(f"bubble (idle / busy time, mean over ranks): measured {idle_over_busy:.3f}, "
          f"theory {formula} = {theory:.3f}")
    print(f"idle share of the step: measured {idle_over_span:.3f}, "
          f"theory {theory / (1 + theory):.3f}")
    print(f"wrote {folder / 'timeline.png'} and {folder / 'trace.json'}")


if __name__ == "__main__":
    main()
