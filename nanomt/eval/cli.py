"""`python -m nanomt.eval` and `python -m nanomt.generate`: start the ranks, load, run, report.

Both take Hydra overrides on conf/inference/eval.yaml or generate.yaml and run under torchrun
with any layout the trainer runs (tp with or without sequence parallelism, cp, pp, dp): the
checkpoint is resharded onto it, and every forward runs on whole sequences (nanomt.eval.runner).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nanomt.config import CONF_DIR, check_model_fits_layout, resolve_layout
from nanomt.errors import ConfigError
from nanomt.eval.generation import SamplingSettings, generate_text
from nanomt.eval.perplexity import dataset_loss, validation_stream
from nanomt.eval.report import log_to_wandb, results_table, write_results
from nanomt.eval.runner import ParallelLM, checkpoint_meta, load_parallel_lm
from nanomt.eval.tasks import PromptSettings, evaluate_task, load_task
from nanomt.model import ModelConfig
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.launch import init_distributed

INFERENCE_CONF_DIR = CONF_DIR / "inference"


def _device(name: str, launched_on: torch.device) -> torch.device:
    if name == "auto":
        return launched_on
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available", "set device=auto")
    return torch.device(name)


def start(cfg: DictConfig) -> tuple[ParallelLM, dict]:
    """Join the launch, build the grid and load the checkpoint onto it: (lm, meta.json)."""
    if cfg.checkpoint is None or not Path(str(cfg.checkpoint)).exists():
        raise ConfigError(f"checkpoint={cfg.checkpoint} does not exist",
                          "pass checkpoint=<a step folder or a checkpoint root>")
    _, world_size, launched_on = init_distributed(cfg.parallel.timeout_s,
                                                  cfg.parallel.init_timeout_s)
    meta = checkpoint_meta(cfg.checkpoint)
    layout = resolve_layout(cfg, world_size)
    check_model_fits_layout(ModelConfig.from_dict(meta["model"]), layout)
    grid = ParallelGrid(layout.tp, layout.pp, layout.dp, timeout_s=cfg.parallel.timeout_s,
                        cp=layout.cp, ep=layout.ep)
    lm = load_parallel_lm(meta["folder"], grid, layout.virtual_stages,
                          _device(str(cfg.device), launched_on), cfg.tokenizer,
                          sequence_parallel=layout.sequence_parallel)
    return lm, meta


def evaluate(lm: ParallelLM, cfg: DictConfig, run_config: dict | None) -> dict[str, dict]:
    """Perplexity (eval.perplexity) and every task of eval.tasks: {name: kind, metrics, ...}."""
    e = cfg.eval
    results: dict[str, dict] = {}
    if e.perplexity:
        stream = validation_stream(run_config, e.data_path, lm.seq_len, int(e.num_samples))
        metrics = dataset_loss(lm, stream, int(e.num_samples), int(e.batch_size))
        results["validation"] = {"kind": "perplexity", "count": f"{metrics['tokens']} tokens",
                                 "metrics": {"loss": metrics["loss"], "ppl": metrics["ppl"]}}
    settings = PromptSettings(int(e.num_fewshot), int(e.seed), str(e.target_delimiter),
                              str(e.fewshot_delimiter))
    for spec in OmegaConf.to_container(e.tasks, resolve=True):
        task = load_task(spec)
        result = evaluate_task(lm, task, settings, int(e.batch_size))
        results[task.name] = {"kind": task.kind, "count": len(task.examples),
                              "metrics": result.metrics, "examples": result.examples}
    return results


def run_eval(cfg: DictConfig, run_dir: Path) -> dict[str, dict]:
    """The whole `python -m nanomt.eval`; returns the results (every rank). Tests call it."""
    lm, meta = start(cfg)
    results = evaluate(lm, cfg, meta.get("config"))
    if lm.grid is None or lm.grid.rank == 0:
        print(f"nanomt eval: {meta['folder']} (step {meta.get('step')})", flush=True)
        print(results_table(results), flush=True)
        config = OmegaConf.to_container(cfg, resolve=True)
        path = write_results(Path(run_dir), {"checkpoint": meta["folder"],
                                             "step": meta.get("step"), "config": config,
                                             "results": results})
        print(f"results: {path}", flush=True)
        log_to_wandb(Path(run_dir), config["logging"]["wandb"], config, results)
    return results


def run_generate(cfg: DictConfig) -> list[str]:
    """The whole `python -m nanomt.generate`; prints and returns the continuations."""
    lm, _ = start(cfg)
    prompts = [cfg.prompt] if isinstance(cfg.prompt, str) else [str(p) for p in cfg.prompt]
    settings = SamplingSettings(**OmegaConf.to_container(cfg.gen, resolve=True))
    texts = generate_text(lm, prompts, settings)
    if lm.grid is None or lm.grid.rank == 0:
        for prompt, text in zip(prompts, texts):
            print(f"{prompt}{text}\n", flush=True)
    return texts


def hydra_entry(config_name: str, body) -> None:
    """Run `body(cfg, run_dir)` under Hydra with conf/inference/<config_name>.yaml (one run
    folder for every rank, as in training); bad input exits with one line (nanomt.errors)."""
    import os
    from datetime import datetime

    import hydra
    import torch.distributed as dist
    from hydra.core.hydra_config import HydraConfig

    config_dir = INFERENCE_CONF_DIR
    from nanomt.errors import NanomtError, exit_with
    from nanomt.parallel.launch import agree_on_run_stamp

    if "NANOMT_RUN_STAMP" not in os.environ:
        os.environ["NANOMT_RUN_STAMP"] = agree_on_run_stamp(
            datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))

    @hydra.main(config_path=str(config_dir), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        try:
            body(cfg, Path(HydraConfig.get().runtime.output_dir))
        except NanomtError as error:
            exit_with(error)
        if dist.is_initialized():
            dist.destroy_process_group()

    _main()


def main(argv: list[str] | None = None) -> None:
    """`python -m nanomt.eval [overrides]`."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    hydra_entry("eval", run_eval)
