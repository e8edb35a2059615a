r"""Plan a layout: parameters, bytes per GPU, bubble, FLOPs and step time, before the launch.

    python tools/plan.py model=mtnlg_530b parallel.tp=8 parallel.pp=35 parallel.dp=8 \
        train.global_batch_size=1920 train.micro_batch_size=1
    python tools/plan.py model=gpt_1_3b parallel.tp=2 parallel.dp=4 parallel.zero_stage=1 \
        train.precision=bf16 plan.gpu_memory_gb=40 plan.json_out=plan.json

The overrides are the training ones (same config groups, same checks), plus plan.* (conf/plan/
default.yaml). The maths lives in nanomt.planner; docs/planner.md explains it and shows the
MT-NLG 530B plan next to the paper. Exit code 0 when the layout fits, 1 when it does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanomt.config import compose_checked  # noqa: E402
from nanomt.errors import NanomtError, exit_with  # noqa: E402
from nanomt.planner import make_plan, meta_shard_params, plan_json, plan_table  # noqa: E402
from nanomt.planner.from_config import plan_inputs  # noqa: E402


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        cfg = compose_checked(["+plan=default", *argv])
        model, inputs = plan_inputs(cfg)
    except NanomtError as error:
        exit_with(error)
    plan = make_plan(model, inputs)
    meta = None
    if cfg.plan.meta_check:
        meta = meta_shard_params(model, inputs.tp, inputs.pp, inputs.virtual_stages,
                                 plan.largest_pp_rank,
                                 sequence_parallel=inputs.sequence_parallel)
    iteration_time = cfg.plan.iteration_time_s
    print(plan_table(plan, meta, iteration_time))
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
