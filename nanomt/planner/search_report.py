"""The search's answer as a person reads it (a ranking) and as a program reads it (JSON), and
the launch command of the pick."""

from __future__ import annotations

from dataclasses import asdict

from nanomt.planner.estimate import GIB, Plan, PlanInputs
from nanomt.planner.search import Candidate, SearchResult, largest_term, why_faster
from nanomt.planner.step_time import TERMS, Machine

MEMORY_KINDS = ("weights", "grads", "optimizer", "activations", "zero3_gathered")


def layout_overrides(x: PlanInputs) -> list[str]:
    """The training overrides that select layout `x` (nanomt.train's keys)."""
    experts = [f"parallel.ep={x.ep}"] if x.ep > 1 else []
    return [f"parallel.tp={x.tp}", f"parallel.cp={x.cp}", f"parallel.pp={x.pp}",
            f"parallel.dp={x.dp}", f"parallel.virtual_stages={x.virtual_stages}",
            f"parallel.schedule={x.schedule}", f"parallel.zero_stage={x.zero_stage}",
            f"parallel.sequence_parallel={str(x.sequence_parallel).lower()}",
            f"train.micro_batch_size={x.micro_batch}",
            f"train.global_batch_size={x.global_batch}",
            f"train.activation_checkpointing={x.recompute}", f"train.precision={x.precision}",
            *experts]


def launch_command(x: PlanInputs, gpus_per_node: int, other_overrides: list[str]) -> str:
    """torchrun ... -m nanomt.train with `other_overrides` (the model, data, ...) and the
    layout; on several nodes, run it on each with its --node-rank (launch/ has the scripts)."""
    keys = {o.split("=", 1)[0] for o in layout_overrides(x)}
    kept = [o for o in other_overrides
            if o.split("=", 1)[0].lstrip("+") not in keys and not o.startswith(("plan.", "+plan"))]
    nodes, per_node = max(1, x.num_gpus // gpus_per_node), min(x.num_gpus, gpus_per_node)
    rendezvous = ("" if nodes == 1 else
                  " --node-rank=$NODE_RANK --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500")
    return (f"torchrun --nnodes={nodes} --nproc-per-node={per_node}{rendezvous} "
            f"-m nanomt.train " + " ".join(kept + layout_overrides(x)))


def describe(x: PlanInputs) -> str:
    experts = f" ep{x.ep}" if x.ep > 1 else ""
    return (f"tp{x.tp} cp{x.cp} pp{x.pp} v{x.virtual_stages} dp{x.dp}{experts} {x.schedule} "
            f"ZeRO-{x.zero_stage} SP={'on' if x.sequence_parallel else 'off'} "
            f"recompute={x.recompute} b={x.micro_batch}")


def candidate_json(c: Candidate) -> dict:
    p = c.plan
    return {"layout": asdict(p.inputs),
            "step_time_s": c.time.total, "step_time_terms_s": dict(c.time.terms),
            "bytes_per_gpu": {**p.bytes_per_gpu, "total": p.total_bytes},
            "bubble_fraction": p.bubble_fraction, "num_microbatches": p.inputs.num_microbatches,
            "tokens_per_s": p.tokens_per_s * p.step_time_s / c.time.total}


def search_json(result: SearchResult, top: int, reference: PlanInputs | None,
                machine: Machine, launch: str | None) -> dict:
    best = result.ranked[:top]
    out = {"machine": asdict(machine), "considered": result.considered,
           "feasible": len(result.ranked), "dropped_by_largest_term": dict(result.dropped),
           "best": [candidate_json(c) for c in best],
           "why_faster_than_next": [why_faster(a, b)
                                    for a, b in zip(result.ranked[:top], result.ranked[1:top + 1])],
           "launch": launch}
    if reference is not None:
        place = result.rank_of(reference)
        out["reference"] = {"rank": place}
        if place:
            mine = result.ranked[place - 1]
            out["reference"].update(candidate_json(mine))
            if place > 1:
                out["reference"]["best_beats_it"] = why_faster(result.ranked[0], mine)
    return out


def candidate_lines(place: int, c: Candidate) -> list[str]:
    p, t = c.plan, c.time.terms
    memory = ", ".join(f"{k} {p.bytes_per_gpu[k] / GIB:.1f}" for k in MEMORY_KINDS
                       if p.bytes_per_gpu[k])
    terms = ", ".join(f"{k} {t[k]:.3g}" for k in TERMS if t[k])
    return [f"#{place}  {describe(p.inputs)}: {c.time.total:.3g} s per step",
            f"    memory GiB: {memory} = {p.total_bytes / GIB:.1f}",
            f"    bubble {p.bubble_fraction:.4f} ({p.inputs.num_microbatches} micro-batches); "
            f"seconds: {terms}"]


def search_table(result: SearchResult, top: int, reference: Plan | None,
                 launch: str | None) -> str:
    """The ranking tools/plan.py --search prints; `reference` is the plan of the config's own
    layout (None: no full layout given)."""
    dropped = ", ".join(f"{n} by {k}" for k, n in result.dropped.most_common())
    lines = [f"{result.considered} layouts, {len(result.ranked)} fit; over memory: "
             f"{dropped or 'none'}"]
    ranked = result.ranked
    for place, c in enumerate(ranked[:top], 1):
        lines += candidate_lines(place, c)
        if place < len(ranked):
            lines.append(f"    vs #{place + 1}: {why_faster(c, ranked[place])}")
    if reference is not None:
        place = result.rank_of(reference.inputs)
        if place is None and not reference.fits:
            term = largest_term(reference)
            lines.append(f"the config's layout ({describe(reference.inputs)}) does not fit: "
                         f"{term} {reference.bytes_per_gpu[term] / GIB:.1f} GiB of "
                         f"{reference.total_bytes / GIB:.1f}")
        elif place is None:
            lines.append(f"the config's layout ({describe(reference.inputs)}) is not one the "
                         "search walks (plan.gpus, the micro-batch sizes, cp)")
        elif place > top:
            lines += candidate_lines(place, ranked[place - 1])
        if place and place > 1:
            lines.append(f"the config's layout ranks #{place}; #1 is "
                         f"{why_faster(ranked[0], ranked[place - 1])}")
    if launch:
        lines += ["launch #1:", "    " + launch]
    return "\n".join(lines)
