r"""Plan a layout: parameters, bytes per GPU, bubble, FLOPs and step time, before the launch.

    python tools/plan.py model=mtnlg_530b parallel.tp=8 parallel.pp=35 parallel.dp=8 \
        train.global_batch_size=1920 train.micro_batch_size=1
    python tools/plan.py model=gpt_1_3b parallel.tp=2 parallel.dp=4 parallel.zero_stage=1 \
        train.precision=bf16 plan.gpu_memory_gb=40 plan.json_out=plan.json
    python tools/plan.py model=mixtral_8x7b parallel.tp=2 parallel.pp=4 parallel.dp=8 \
        parallel.ep=8 parallel.zero_stage=1 train.global_batch_size=256 train.precision=bf16

(a mixture of experts adds its active parameters, experts per rank and all-to-all bytes:
docs/moe.md)

Choose the layout instead (every layout of plan.gpus GPUs that fits, fastest first by the
step-time model, with the launch command of the best; a full layout in the overrides is the
reference the search says it beats or not):

    python tools/plan.py --search model=mtnlg_530b plan.gpus=2240 \
        train.global_batch_size=1920 train.precision=bf16        [--json: JSON on stdout]

Measure this machine first (--calibrate: matmul TFLOP/s at the model's shapes, gloo's
collective bandwidth and latency on plan.gpus spawned CPU ranks), then plan with it:

    python tools/plan.py --calibrate model=tiny plan.gpus=4 plan.machine_file=machine.json
    python tools/plan.py --search model=tiny plan.gpus=4 plan.machine_file=machine.json

For a pipelined layout (pp > 1) the table adds what the zero-bubble schedules (parallel.schedule
=zb_h1) would save per step and hold in activations; plan it under one to see its own table.

The overrides are the training ones (same config groups, same checks), plus plan.* (conf/plan/
default.yaml: the GPU, the links, plan.machine_file). The maths lives in nanomt.planner;
docs/planner.md explains it and shows the MT-NLG 530B plan next to the paper. Exit code 0 when
the layout fits (--search: when one does), 1 when it does not.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanomt.config import compose_checked  # noqa: E402
from nanomt.errors import NanomtError, exit_with  # noqa: E402
from nanomt.planner import make_plan, meta_shard_params, plan_json, plan_table  # noqa: E402
from nanomt.planner.from_config import machine, plan_inputs, search_inputs  # noqa: E402
from nanomt.planner.search import search  # noqa: E402
from nanomt.planner.search_report import launch_command, search_json, search_table  # noqa: E402
from nanomt.planner.step_time import step_time  # noqa: E402

ZERO_BUBBLE = (("zb_h1", 1), ("zbv", 2))  # (parallel.schedule, its chunks per rank)


def run_calibrate(cfg) -> int:
    """--calibrate: measure plan.gpus ranks of this machine, write plan.machine_file."""
    from nanomt.config import model_config
    from nanomt.planner.calibrate import machine_file, measure_rank
    from nanomt.testing import run_distributed

    world = int(cfg.plan.gpus or 4)
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[str(cfg.train.precision)]
    per_rank = run_distributed(measure_rank, world, args=(
        model_config(cfg), int(cfg.train.micro_batch_size), dtype), timeout_s=600)
    found = machine_file(per_rank, world)
    path = Path(cfg.plan.machine_file or "machine.json")
    path.write_text(json.dumps(found, indent=2))
    print(json.dumps(found, indent=2))
    print(f"wrote {path}: plan with plan.machine_file={path}")
    return 0


def run_search(cfg, overrides: list[str], as_json: bool) -> int:
    """--search: rank every layout of plan.gpus; print the best plan.top and the launch (as
    JSON on stdout with --json; plan.json_out writes the JSON to a file)."""
    model, base, reference, gpus = search_inputs(cfg)
    cluster = machine(cfg)
    result = search(model, base, gpus, cluster)
    top = int(cfg.plan.top)
    launch = (launch_command(result.ranked[0].plan.inputs, cluster.gpus_per_node, overrides)
              if result.ranked else None)
    found = json.dumps(search_json(result, top, reference, cluster, launch), indent=2)
    mine = make_plan(model, reference) if reference is not None else None
    print(found if as_json else search_table(result, top, mine, launch))
    if cfg.plan.json_out:
        Path(cfg.plan.json_out).write_text(found)
    return 0 if result.ranked else 1


def zero_bubble_alternatives(model, inputs, cluster) -> dict:
    """The same layout under the zero-bubble schedules it is not already run with and the
    config accepts (pp > 1; ZB-V: 2p | layers, untied embeddings): {schedule: (plan,
    modelled step time)}, for the table's saving rows."""
    if inputs.pp == 1:
        return {}
    out = {}
    for schedule, v in ZERO_BUBBLE:
        accepted = model.num_layers % (inputs.pp * v) == 0 and not (
            schedule == "zbv" and model.tie_embeddings)  # nanomt.config's rules
        if schedule != inputs.schedule and accepted:
            x = replace(inputs, schedule=schedule, virtual_stages=v)
            plan = make_plan(model, x)
            out[schedule] = (plan, step_time(model, x, plan.params_per_rank,
                                             plan.hardware_flops_per_iteration,
                                             plan.model_flops_per_iteration, cluster))
    return out


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    flags = {a for a in argv if a.startswith("--")}
    overrides = [a for a in argv if not a.startswith("--")]
    try:
        cfg = compose_checked(["+plan=default", *overrides])
        if "--calibrate" in flags:
            return run_calibrate(cfg)
        if "--search" in flags:
            return run_search(cfg, overrides, "--json" in flags)
        model, inputs = plan_inputs(cfg)
        cluster = machine(cfg)
    except NanomtError as error:
        exit_with(error)
    plan = make_plan(model, inputs)
    modelled = step_time(model, inputs, plan.params_per_rank, plan.hardware_flops_per_iteration,
                         plan.model_flops_per_iteration, cluster, plan.expert_params_per_rank)
    meta = None
    if cfg.plan.meta_check:
        meta = meta_shard_params(model, inputs.tp, inputs.pp, inputs.virtual_stages,
                                 plan.largest_pp_rank,
                                 sequence_parallel=inputs.sequence_parallel,
                                 schedule=inputs.schedule, ep=inputs.ep)
    iteration_time = cfg.plan.iteration_time_s
    print(plan_table(plan, meta, iteration_time, modelled,
                     zero_bubble_alternatives(model, inputs, cluster)))
    if cfg.plan.json_out:
        Path(cfg.plan.json_out).write_text(json.dumps(plan_json(plan, meta, iteration_time),
                                                      indent=2))
    if meta is not None and meta != plan.params_per_rank:
        print(f"error: the meta-device shard holds {meta:,} parameters, the plan "
              f"{plan.params_per_rank:,}", file=sys.stderr)
        return 2
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
