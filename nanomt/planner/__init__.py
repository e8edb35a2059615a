"""Plan a layout before booking the GPUs: does it fit, and how fast should it run.

`make_plan` (estimate.py) turns a model and a layout into parameters per rank (params.py),
bytes per GPU, the pipeline bubble, FLOPs and step time; `meta_shard_params` (meta_shard.py)
builds the largest rank's shard of the real model on the meta device to check the count;
report.py prints the table and writes the JSON of tools/plan.py.
"""

from nanomt.planner.estimate import Plan, PlanInputs, make_plan
from nanomt.planner.meta_shard import meta_shard_params
from nanomt.planner.params import largest_pipeline_rank, params_on_pipeline_rank
from nanomt.planner.report import plan_json, plan_table

__all__ = ["Plan", "PlanInputs", "largest_pipeline_rank", "make_plan", "meta_shard_params",
           "params_on_pipeline_rank", "plan_json", "plan_table"]
