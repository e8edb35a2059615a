"""The planner's inputs from a training config: the same keys, checked the same way."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig

from nanomt.config import check_config, model_config
from nanomt.errors import ConfigError
from nanomt.model.config import ModelConfig
from nanomt.planner.estimate import PlanInputs
from nanomt.planner.step_time import Machine


def plan_inputs(cfg: DictConfig) -> tuple[ModelConfig, PlanInputs]:
    """The model and layout of `cfg` (parallel.dp must be given: there is no world to infer
    it from), after the checks training runs (nanomt.config.check_config)."""
    p = cfg.parallel
    if p.dp is None:
        raise ConfigError("parallel.dp is null: the planner has no world size to infer it from",
                          "set parallel.dp")
    model, layout, _ = check_config(cfg, int(p.tp) * int(p.get("cp", 1)) * int(p.pp) * int(p.dp))
    return model, _inputs(cfg, tp=layout.tp, pp=layout.pp, dp=layout.dp, cp=layout.cp,
                          ep=layout.ep, virtual_stages=layout.virtual_stages,
                          sequence_parallel=layout.sequence_parallel,
                          zero_stage=layout.zero_stage)


def _inputs(cfg: DictConfig, **layout) -> PlanInputs:
    p, t = cfg.parallel, cfg.train
    return PlanInputs(
        **layout, schedule=str(p.schedule), zero3_prefetch=int(p.zero3_prefetch),
        micro_batch=int(t.micro_batch_size), global_batch=int(t.global_batch_size),
        recompute=str(t.activation_checkpointing), precision=str(t.precision),
        fp32_grads=bool(t.fp32_grads), gpu_memory_gb=float(cfg.plan.gpu_memory_gb),
        tflops_per_gpu=float(cfg.plan.tflops_per_gpu), bucket_mb=float(p.bucket_size_mb),
        overlap_param_gather=bool(p.overlap_param_gather))


def search_inputs(cfg: DictConfig) -> tuple[ModelConfig, PlanInputs, PlanInputs | None, int]:
    """(model, the inputs the search varies the layout of, the config's own layout when
    parallel.dp is given (the search says where it ranks), plan.gpus)."""
    p = cfg.parallel
    reference = None
    if p.dp is not None:
        model, reference = plan_inputs(cfg)
    else:
        model = model_config(cfg)
    gpus = cfg.plan.gpus or (reference.num_gpus if reference else None)
    if not gpus or int(gpus) < 1:
        raise ConfigError("plan.gpus is not set: the search needs the cluster's GPU count",
                          "set plan.gpus (or a full layout with parallel.dp)")
    base = reference or _inputs(cfg, tp=1, pp=1, dp=int(gpus), cp=1, ep=1, virtual_stages=1,
                                sequence_parallel=False, zero_stage=0)
    return model, base, reference, int(gpus)


def machine(cfg: DictConfig) -> Machine:
    """The cluster of plan.*; plan.machine_file (written by tools/plan.py --calibrate)
    overrides the keys it holds."""
    values = {f.name: type(f.default)(cfg.plan[f.name]) for f in fields(Machine)
              if cfg.plan.get(f.name) is not None}
    if cfg.plan.get("machine_file"):
        path = Path(cfg.plan.machine_file)
        if not path.exists():
            raise ConfigError(f"plan.machine_file {path} does not exist",
                              "run tools/plan.py --calibrate or set plan.machine_file")
        measured = json.loads(path.read_text())
        values.update({f.name: measured[f.name] for f in fields(Machine) if f.name in measured})
    return Machine(**values)
