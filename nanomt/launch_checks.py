"""The checks a launch runs before any process group exists: the config's, then the subsystems'.

`nanomt.config.check_config` holds every rule of the config itself and imports no subsystem.
The rules that live in a subsystem are checked here, by that subsystem: the pipeline's message
plan (nanomt.parallel.forward_backward), the learning-rate floor (nanomt.optim.schedule), the
tokenizer and the data files (nanomt.data.build), the checkpoint to resume from (nanomt.
checkpoint.checkpointer) and the evaluation tasks (nanomt.eval.tasks). Each becomes a
ConfigError naming the key, so a bad input still stops the launch with one line and exit code 2
(nanomt.train's preflight, and again in setup).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from nanomt.checkpoint.checkpointer import check_resume
from nanomt.config import Layout, check_config
from nanomt.config_rules import as_config_error
from nanomt.data.build import check_data
from nanomt.errors import ConfigError
from nanomt.eval.tasks import load_task
from nanomt.model.config import ModelConfig
from nanomt.optim.schedule import check_floor
from nanomt.parallel.forward_backward import check_schedule_plans


def check_launch(cfg: DictConfig, world_size: int) -> tuple[ModelConfig, Layout, int]:
    """check_config, then the subsystems' checks. Returns (model, layout, micro-batches)."""
    model_cfg, layout, num_microbatches = check_config(cfg, world_size)
    try:
        check_schedule_plans(str(cfg.parallel.schedule), layout.pp, num_microbatches,
                             layout.virtual_stages)
    except ValueError as error:
        raise ConfigError(str(error), "change parallel.schedule, .pp or .virtual_stages") from error
    try:
        check_floor(cfg.optim.lr, cfg.optim.min_lr)
    except ValueError as error:
        raise as_config_error(error, "optim.min_lr") from error
    check_data(cfg, model_cfg.vocab_size)  # the tokenizer and the data files
    check_resume(cfg, model_cfg)  # the checkpoint's meta.json
    if cfg.train.get("eval_tasks"):  # read now, not at the first validation pass
        for spec in OmegaConf.to_container(cfg.train.eval_tasks, resolve=True):
            load_task(spec, key="train.eval_tasks")
    return model_cfg, layout, num_microbatches
