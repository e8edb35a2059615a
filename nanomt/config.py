"""Checking a run's configuration before anything expensive happens.

Hydra composes the config from conf/ and the command line; this module turns the parts the code
relies on into checked values and fails early, with the key to change, when they cannot work:
a layout that does not cover the world, a tp that does not divide the heads, a batch that does
not split into micro-batches, a feature that is not built yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from nanomt.model.config import ModelConfig
from nanomt.parallel.grid import infer_dp, validate_layout
from nanomt.parallel.pipeline.schedules import check_pipeline_config

PRECISIONS = ("fp32", "bf16", "fp16")

# Features whose config keys exist but whose implementation has not landed. Each entry:
# (description, predicate on the config). Removing an entry is part of landing the feature.
NOT_IMPLEMENTED: list[tuple[str, object]] = [
]


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    virtual_stages: int
    sequence_parallel: bool
    zero_stage: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def model_config(cfg: DictConfig) -> ModelConfig:
    values = OmegaConf.to_container(cfg.model, resolve=True)
    return ModelConfig.from_dict(values)


def resolve_layout(cfg: DictConfig, world_size: int) -> Layout:
    p = cfg.parallel
    dp = p.dp if p.dp is not None else infer_dp(world_size, p.tp, p.pp)
    validate_layout(world_size, p.tp, p.pp, dp)
    if p.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    if p.virtual_stages < 1:
        raise ValueError(f"parallel.virtual_stages must be >= 1, got {p.virtual_stages}")
    return Layout(tp=p.tp, pp=p.pp, dp=dp, virtual_stages=p.virtual_stages,
                  sequence_parallel=bool(p.sequence_parallel), zero_stage=p.zero_stage)


def check_model_fits_layout(model: ModelConfig, layout: Layout) -> None:
    """tp must divide heads, hidden, ffn and the padded vocabulary; SP needs tp | seq_len."""
    tp = layout.tp
    for what, value in (("model.num_heads", model.num_heads),
                        ("model.hidden_size", model.hidden_size),
                        ("model.ffn_hidden_size", model.ffn_hidden_size)):
        if value % tp:
            raise ValueError(f"{what} = {value} is not divisible by parallel.tp = {tp}")
    if model.padded_vocab_size(tp) % tp:
        raise ValueError(f"padded vocabulary {model.padded_vocab_size(tp)} not divisible by tp")
    if layout.sequence_parallel and model.seq_len % tp:
        raise ValueError(f"parallel.sequence_parallel needs model.seq_len ({model.seq_len}) "
                         f"divisible by parallel.tp ({tp})")


def check_batch(cfg: DictConfig, layout: Layout) -> int:
    """Returns the number of micro-batches per optimizer step on each data-parallel rank."""
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * layout.dp):
        raise ValueError(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
            f"train.micro_batch_size * dp ({t.micro_batch_size} * {layout.dp})")
    return t.global_batch_size // (t.micro_batch_size * layout.dp)


def check_pipeline(cfg: DictConfig, model: ModelConfig, layout: Layout, num_microbatches: int
                   ) -> None:
    """Layers split into pp * virtual_stages chunks; interleaving needs m a multiple of pp."""
    schedule = str(cfg.parallel.schedule)
    check_pipeline_config(model.num_layers, layout.pp, layout.virtual_stages, num_microbatches,
                          schedule)


def check_config(cfg: DictConfig, world_size: int) -> tuple[ModelConfig, Layout, int]:
    """Everything that can be checked before a collective. Returns (model, layout, micro-batches)."""
    if cfg.train.precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {cfg.train.precision}")
    if cfg.train.steps < 1:
        raise ValueError(f"train.steps must be >= 1, got {cfg.train.steps}")
    model = model_config(cfg)
    layout = resolve_layout(cfg, world_size)
    check_model_fits_layout(model, layout)
    num_microbatches = check_batch(cfg, layout)
    check_pipeline(cfg, model, layout, num_microbatches)
    for description, applies in NOT_IMPLEMENTED:
        if applies(cfg):
            raise NotImplementedError(f"{description} is not implemented yet")
    return model, layout, num_microbatches
