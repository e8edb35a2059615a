"""The planner's inputs from a training config: the same keys, checked the same way."""

from __future__ import annotations

from omegaconf import DictConfig

from nanomt.config import check_config
from nanomt.errors import ConfigError
from nanomt.model.config import ModelConfig
from nanomt.planner.estimate import PlanInputs


def plan_inputs(cfg: DictConfig) -> tuple[ModelConfig, PlanInputs]:
    """The model and layout of `cfg` (parallel.dp must be given: there is no world to infer
    it from), after the checks training runs (nanomt.config.check_config)."""
    p, t = cfg.parallel, cfg.train
    if p.dp is None:
        raise ConfigError("parallel.dp is null: the planner has no world size to infer it from",
                          "set parallel.dp")
    model, layout, _ = check_config(cfg, int(p.tp) * int(p.get("cp", 1)) * int(p.pp) * int(p.dp))
    return model, PlanInputs(
        tp=layout.tp, pp=layout.pp, dp=layout.dp, cp=layout.cp,
        virtual_stages=layout.virtual_stages,
        schedule=str(p.schedule), zero_stage=layout.zero_stage,
        zero3_prefetch=int(p.zero3_prefetch), micro_batch=int(t.micro_batch_size),
        global_batch=int(t.global_batch_size), sequence_parallel=layout.sequence_parallel,
        recompute=str(t.activation_checkpointing), precision=str(t.precision),
        fp32_grads=bool(t.fp32_grads), gpu_memory_gb=float(cfg.plan.gpu_memory_gb),
        tflops_per_gpu=float(cfg.plan.tflops_per_gpu))
