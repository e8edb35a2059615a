"""Plan a layout before booking the GPUs: does it fit, how fast should it run, which to choose.

`make_plan` (estimate.py) turns a model and a layout into parameters per rank (params.py),
bytes per GPU, the pipeline bubble and FLOPs; `step_time` (step_time.py) adds up one step's
seconds term by term on a `Machine` (plan.* or a --calibrate file, calibrate.py); `search`
(search.py) ranks every layout of a cluster that fits; `meta_shard_params` (meta_shard.py)
builds the largest rank's shard of the real model on the meta device to check the count;
report.py and search_report.py print the tables and write the JSON of tools/plan.py.
"""

from nanomt.planner.estimate import Plan, PlanInputs, make_plan
from nanomt.planner.meta_shard import meta_shard_params
from nanomt.planner.params import largest_pipeline_rank, params_on_pipeline_rank
from nanomt.planner.report import plan_json, plan_table
from nanomt.planner.search import search
from nanomt.planner.step_time import Machine, StepTime, step_time

__all__ = ["Machine", "Plan", "PlanInputs", "StepTime", "largest_pipeline_rank", "make_plan",
           "meta_shard_params", "params_on_pipeline_rank", "plan_json", "plan_table", "search",
           "step_time"]
