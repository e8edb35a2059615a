"""The plan as a person reads it (a table) and as a program reads it (JSON)."""

from __future__ import annotations

from dataclasses import asdict

from nanomt.planner.estimate import GIB, Plan
from nanomt.planner.schedule_costs import bubble_formula, pass_times
from nanomt.planner.step_time import StepTime


def plan_json(plan: Plan, meta_shard_params: int | None,
              iteration_time_s: float | None = None) -> dict:
    """Every number of the table; `meta_shard_params` is the meta-device count (or None)."""
    x = plan.inputs
    out = {"inputs": asdict(x), "num_gpus": x.num_gpus, "num_microbatches": x.num_microbatches,
           "params_total": plan.params_total, "params_active": plan.params_active,
           "params_per_rank": plan.params_per_rank,
           "expert_params_per_rank": plan.expert_params_per_rank,
           "largest_pp_rank": plan.largest_pp_rank, "meta_shard_params": meta_shard_params,
           "bytes_per_gpu": {**plan.bytes_per_gpu, "total": plan.total_bytes},
           "activation_pp_rank": plan.activation_pp_rank,
           "microbatches_in_flight": plan.microbatches_in_flight,
           "bubble_fraction": plan.bubble_fraction,
           "bubble_formula": bubble_formula(x.schedule, x.virtual_stages,
                                            pass_times(x.recompute)),
           "flops_per_iteration": plan.flops_per_iteration,
           "hardware_flops_per_iteration": plan.hardware_flops_per_iteration,
           "model_flops_per_iteration": plan.model_flops_per_iteration,
           "all_to_all_bytes_per_step": plan.all_to_all_bytes_per_step,
           "step_time_s": plan.step_time_s, "tokens_per_s": plan.tokens_per_s,
           "fits": plan.fits, "advice": plan.advice}
    if iteration_time_s:
        out["iteration_time_s"] = iteration_time_s
        out["achieved_tflops_per_gpu"] = achieved_tflops(plan, iteration_time_s)
    return out


def achieved_tflops(plan: Plan, iteration_time_s: float) -> float:
    """The paper's TFLOP/s per GPU: F / (iteration time x GPUs)."""
    return plan.flops_per_iteration / (iteration_time_s * plan.inputs.num_gpus) / 1e12


def plan_table(plan: Plan, meta_shard_params: int | None,
               iteration_time_s: float | None = None, modelled: StepTime | None = None,
               alternatives: dict[str, tuple[Plan, StepTime]] | None = None) -> str:
    """The readable table tools/plan.py prints; `alternatives`: the same layout under other
    schedules (the zero-bubble ones), each a row of what it would save and cost."""
    x, b = plan.inputs, plan.bytes_per_gpu
    experts = f" ep={x.ep}" if x.ep > 1 else ""
    layout = (f"tp={x.tp} cp={x.cp} pp={x.pp} v={x.virtual_stages} dp={x.dp}{experts} "
              f"({x.num_gpus} GPUs), "
              f"ZeRO-{x.zero_stage}, {x.precision}, SP={'on' if x.sequence_parallel else 'off'}, "
              f"recompute={x.recompute}, {x.schedule}")
    meta = ("not built" if meta_shard_params is None else f"{meta_shard_params:,} "
            + ("(equal)" if meta_shard_params == plan.params_per_rank else "(DIFFERS)"))
    rows = [("layout", layout),
            ("batch", f"global {x.global_batch}, micro {x.micro_batch}, "
                      f"{x.num_microbatches} micro-batches per step"),
            ("parameters, total", f"{plan.params_total:,} ({plan.params_total / 1e9:.1f}B)"),
            ("parameters, largest rank", f"{plan.params_per_rank:,} (pipeline rank "
                                         f"{plan.largest_pp_rank})"),
            ("  meta-device shard", meta)]
    if plan.params_active != plan.params_total:
        rows.insert(3, ("parameters, active", f"{plan.params_active:,} "
                                              f"({plan.params_active / 1e9:.1f}B per token)"))
        rows += [("  of them experts", f"{plan.expert_params_per_rank:,} (E/ep per MoE layer, "
                                       f"ZeRO over dp*cp/ep = {x.expert_dp})"),
                 ("all-to-all per step", f"{plan.all_to_all_bytes_per_step / GIB:,.2f} GiB "
                                         f"sent per rank")]
    for kind in ("weights", "grads", "optimizer", "activations", "zero3_gathered"):
        if kind == "zero3_gathered" and x.zero_stage < 3:
            continue
        rows.append((f"GiB per GPU, {kind}", f"{b[kind] / GIB:,.2f}"))
    rows.append(("GiB per GPU, total", f"{plan.total_bytes / GIB:,.2f} of "
                                       f"{x.gpu_memory_gb:g}"))
    rows += [("  activations from", f"pipeline rank {plan.activation_pp_rank}, "
                                    f"{plan.microbatches_in_flight} micro-batch passes in flight"),
             ("pipeline bubble", f"{plan.bubble_fraction:.4f} = " + bubble_formula(
                 x.schedule, x.virtual_stages, pass_times(x.recompute))),
             ("F per iteration (paper)", f"{plan.flops_per_iteration / 1e15:,.1f} PFLOP"),
             ("hardware FLOPs", f"{plan.hardware_flops_per_iteration / 1e15:,.1f} PFLOP "
                                f"(recompute={x.recompute})"),
             ("model FLOPs", f"{plan.model_flops_per_iteration / 1e15:,.1f} PFLOP"),
             (f"at {x.tflops_per_gpu:g} TFLOP/s/GPU", f"{plan.step_time_s:,.2f} s per step, "
                                                    f"{plan.tokens_per_s:,.0f} tokens/s")]
    if iteration_time_s:
        rows.append((f"measured {iteration_time_s:g} s/iteration",
                     f"{achieved_tflops(plan, iteration_time_s):.1f} TFLOP/s per GPU (F)"))
    if modelled is not None:
        rows.append(("step-time model", f"{modelled.total:,.2f} s: " + ", ".join(
            f"{k} {v:.3g}" for k, v in modelled.terms.items() if v)))
    if modelled is not None:
        rows += [schedule_row(name, modelled, *other)
                 for name, other in (alternatives or {}).items()]
    rows.append(("fits", "yes" if plan.fits else "NO: " + "; ".join(plan.advice)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def schedule_row(schedule: str, modelled: StepTime, other: Plan,
                 other_time: StepTime) -> tuple[str, str]:
    """What parallel.schedule=`schedule` would save per step against the plan's schedule
    (step-time model) and what its activations would be."""
    saved = modelled.total - other_time.total
    verb, share = "saves" if saved >= 0 else "costs", 100 * abs(saved) / modelled.total
    return (f"with parallel.schedule={schedule}",
            f"bubble {other.bubble_fraction:.4f}, {verb} {abs(saved):,.2f} s per step "
            f"({share:.1f}%); "
            f"activations {other.bytes_per_gpu['activations'] / GIB:,.2f} GiB "
            f"(pipeline rank {other.activation_pp_rank}), total {other.total_bytes / GIB:,.2f}"
            f" GiB{'' if other.fits else ', does NOT fit'}")
