"""Checking a run's configuration before anything expensive happens.

Hydra composes the config from conf/ and the command line; `check_config` turns the parts the code
relies on into checked values and fails early, before any process group exists, with
`ConfigError(what is wrong, the key to change)`; nanomt.train prints it as one line and exits
with code 2. Every rank composes the same config and reaches the same verdict, so the checks
only read the config, never talk.

Each rule lives in one place, in the order the run needs them:

    fields          every key's type and range (tables below, beside the check that uses them;
                    the rules they are made of: nanomt/config_rules.py)
    model           ModelConfig's own rules (style, num_heads | hidden), converted
    layout          world size = tp * cp * pp * dp, dp inferred when null (the grid's rule:
                    nanomt.parallel.layout.validate_layout, converted)
    model vs layout tp divides heads, hidden, ffn; sequence parallelism needs tp | seq_len
    batch           G = m * b * dp: the global batch splits into micro-batches on every replica
    ramp-up         so does every global batch size of train.rampup_batch_size
    pipeline        pp * v divides the layers; interleaving (v > 1) needs pp | m
    schedule        lr > 0, the cosine decay ends after the warm-up
    precision       the fp16 loss scale; train.preempt_signal names a signal

Rules that live in a subsystem (the pipeline's message plan, the learning-rate floor, the
tokenizer and data files, the checkpoint to resume from, the evaluation tasks) are checked by
that subsystem from `nanomt.launch_checks.check_launch`, still before any process group exists,
so checking a config imports none of them. The code that runs trusts these checks.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nanomt.config_rules import (
    BOOL,
    CHECKPOINTING_MODES,
    DEVICE,
    FRACTION,
    GRAD_REDUCE_MODES,
    INT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    OPEN_FRACTION,
    POSITIVE,
    POSITIVE_INT,
    PRECISIONS,
    SCHEDULE_UNITS,
    SCHEDULES,
    STATED_BELOW,
    TEXT,
    check_fields,
    choice,
    or_null,
    warn,
)
from nanomt.data.rampup import check_rampup_config
from nanomt.errors import ConfigError
from nanomt.model.config import ModelConfig
from nanomt.parallel.layout import validate_layout

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The run config Hydra would build for `python -m nanomt.train <overrides>` (no chdir, no run
    folder): for the pre-launch check, and for tests and tools that call `nanomt.train.run`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def compose_checked(overrides: list[str]) -> DictConfig:
    """compose_config, with Hydra's errors (unknown key or preset, bad syntax) as ConfigError."""
    from hydra.errors import HydraException, MissingConfigException

    try:
        return compose_config(overrides)
    except MissingConfigException as error:
        group = (error.missing_cfg_file or "").split("/")[0] or "a config group"
        choice = next((o.split("=", 1) for o in overrides if o.split("=", 1)[0] == group), None)
        name = f"{group}={choice[1]}" if choice else (error.missing_cfg_file or "a preset")
        options = ", ".join(error.options or [])
        raise ConfigError(f"unknown preset {name}", f"choose one of: {options}") from error
    except HydraException as error:
        first = str(error).strip().splitlines()[0]
        if first.startswith("Could not override"):
            key = first.split("'")[1]
            raise ConfigError(f"unknown config key {key!r}",
                              "check the spelling (python -m nanomt.train --cfg job lists every "
                              "key)") from error
        raise ConfigError(f"bad command-line override: {first}",
                          "write overrides as key=value") from error


# ---- the model ----------------------------------------------------------------------------------
MODEL_RULES = {
    "model.style": STATED_BELOW,  # ModelConfig's rule
    **{f"model.{name}": POSITIVE_INT for name in ("num_layers", "hidden_size", "num_heads",
                                                  "seq_len", "vocab_size", "vocab_pad_multiple")},
    "model.ffn_hidden_size": or_null(POSITIVE_INT),
    "model.dropout": FRACTION,
    "model.attention_dropout": or_null(FRACTION),
    "model.init_std": POSITIVE,
    "model.norm_eps": POSITIVE,
    "model.rope_theta": POSITIVE,
    "model.tie_embeddings": or_null(BOOL),
    # model.moe: null (dense) or a mapping; MoEConfig states the cross-field rule (top_k <= E)
    **{f"model.moe.{name}": POSITIVE_INT for name in ("num_experts", "top_k",
                                                      "ffn_hidden_size", "every")},
    "model.moe.shared_experts": NON_NEGATIVE_INT,
    "model.moe.aux_loss_coef": NON_NEGATIVE,
    "model.moe.z_loss_coef": NON_NEGATIVE,
}


def model_config(cfg: DictConfig) -> ModelConfig:
    """The field types and ranges here; ModelConfig states its own rules (the style, heads
    divide hidden, no unknown keys), as "what: fix"."""
    check_fields(cfg, MODEL_RULES)
    try:
        return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    except ValueError as error:
        what, _, fix = str(error).rpartition(": ")
        raise ConfigError(what, fix) from error


# ---- the layout ---------------------------------------------------------------------------------
LAYOUT_RULES = {
    **{f"parallel.{name}": STATED_BELOW for name in ("tp", "pp", "dp", "cp", "ep")},  # validate_layout
    "parallel.virtual_stages": POSITIVE_INT,
    "parallel.schedule": choice(*SCHEDULES),
    "parallel.sequence_parallel": BOOL,
    "parallel.zero_stage": choice(0, 1, 2, 3),
    "parallel.bucket_size_mb": POSITIVE,
    "parallel.grad_reduce": choice(*GRAD_REDUCE_MODES),
    "parallel.reduce_in_flight_mb": or_null(POSITIVE),
    "parallel.zero3_prefetch": NON_NEGATIVE_INT,
    "parallel.overlap_param_gather": BOOL,
    "parallel.timeout_s": POSITIVE,
    "parallel.init_timeout_s": POSITIVE,
}


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    virtual_stages: int
    sequence_parallel: bool
    zero_stage: int
    cp: int = 1
    ep: int = 1  # expert parallelism, folded into the dp x cp ranks (nanomt.parallel.grid)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp


def resolve_layout(cfg: DictConfig, world_size: int) -> Layout:
    """The (tp, cp, pp, dp) layout covering `world_size` ranks; dp: null takes what tp*cp*pp
    leaves (nanomt.parallel.layout states the layout's rule: validate_layout)."""
    check_fields(cfg, LAYOUT_RULES)
    p = cfg.parallel
    tp, pp, cp, ep = p.tp, p.pp, p.get("cp", 1), p.get("ep", 1)
    try:
        dp = validate_layout(world_size, tp, pp, p.dp, cp, ep)
    except ValueError as error:
        what, _, fix = str(error).rpartition(": ")
        raise ConfigError(what, fix) from error
    if p.sequence_parallel and tp == 1:
        warn("parallel.sequence_parallel=true does nothing with parallel.tp=1; "
             "set parallel.tp > 1 or parallel.sequence_parallel=false")
    if p.get("overlap_param_gather") and (p.zero_stage not in (1, 2) or dp * cp == 1):
        warn("parallel.overlap_param_gather=true does nothing here: it overlaps the parameter "
             "all-gather of parallel.zero_stage=1 or 2 over more than one data-parallel rank")
    return Layout(tp=tp, pp=pp, dp=dp, virtual_stages=p.virtual_stages,
                  sequence_parallel=bool(p.sequence_parallel), zero_stage=p.zero_stage, cp=cp,
                  ep=ep)


def check_model_fits_layout(model: ModelConfig, layout: Layout) -> None:
    """tp must divide heads, hidden and ffn (the padded vocabulary is rounded up to a multiple
    of tp by construction); sequence parallelism splits the sequence, so tp must divide it."""
    tp = layout.tp
    for key, value in (("model.hidden_size", model.hidden_size),
                       ("model.num_heads", model.num_heads),
                       ("model.ffn_hidden_size", model.ffn_hidden_size)):
        if value % tp:
            raise ConfigError(f"{key} = {value} is not divisible by parallel.tp = {tp}",
                              f"change parallel.tp or {key}")
    check_context_parallel(model, layout)
    check_experts(model, layout)
    if layout.sequence_parallel and (model.seq_len // layout.cp) % tp:
        held = (f"model.seq_len / parallel.cp ({model.seq_len // layout.cp})" if layout.cp > 1
                else f"model.seq_len ({model.seq_len})")
        raise ConfigError(f"parallel.sequence_parallel needs {held} divisible by "
                          f"parallel.tp ({tp})",
                          "change model.seq_len or parallel.tp, or set "
                          "parallel.sequence_parallel=false")


def check_experts(model: ModelConfig, layout: Layout) -> None:
    """ep splits the experts (model.moe) over ep ranks; tp splits each expert's ffn."""
    if model.moe is None:
        if layout.ep > 1:
            raise ConfigError(f"parallel.ep = {layout.ep} splits experts, but the model is dense "
                              f"(model.moe is null)", "set parallel.ep=1 or model.moe")
        return
    if model.moe.num_experts % layout.ep:
        raise ConfigError(f"model.moe.num_experts = {model.moe.num_experts} is not divisible by "
                          f"parallel.ep = {layout.ep}", "change parallel.ep or model.moe.num_experts")
    if model.moe.ffn_hidden_size % layout.tp:
        raise ConfigError(f"model.moe.ffn_hidden_size = {model.moe.ffn_hidden_size} is not "
                          f"divisible by parallel.tp = {layout.tp}",
                          "change parallel.tp or model.moe.ffn_hidden_size")


def check_context_parallel(model: ModelConfig, layout: Layout) -> None:
    """cp splits each sequence into 2*cp chunks (nanomt.parallel.context_parallel); its ring
    attention has no attention dropout."""
    cp = layout.cp
    if cp == 1:
        return
    if model.seq_len % (2 * cp):
        raise ConfigError(f"parallel.cp = {cp} splits each sequence into 2*cp = {2 * cp} "
                          f"chunks, but model.seq_len = {model.seq_len} is not divisible by it",
                          "change model.seq_len or parallel.cp")
    if model.attention_dropout > 0:
        raise ConfigError(f"ring attention (parallel.cp = {cp}) has no attention dropout, but "
                          f"model.attention_dropout = {model.attention_dropout}",
                          "set model.attention_dropout=0 or parallel.cp=1")


# ---- batches and the pipeline -------------------------------------------------------------------
BATCH_RULES = {
    "train.global_batch_size": POSITIVE_INT,
    "train.micro_batch_size": POSITIVE_INT,
}


def check_batch(cfg: DictConfig, layout: Layout) -> int:
    """Returns m, the number of micro-batches per optimizer step on each data-parallel rank."""
    check_fields(cfg, BATCH_RULES)
    G, b, dp = cfg.train.global_batch_size, cfg.train.micro_batch_size, layout.dp
    if G % (b * dp):
        raise ConfigError(
            f"train.global_batch_size ({G}) is not divisible by train.micro_batch_size * dp "
            f"({b} * {dp} = {b * dp})",
            "change train.global_batch_size or train.micro_batch_size")
    return G // (b * dp)


def check_pipeline(model: ModelConfig, layout: Layout, num_microbatches: int,
                   schedule: str = "1f1b") -> None:
    """Layers split into pp * virtual_stages chunks; interleaving needs m a multiple of pp;
    ZB-H1 is written for one chunk per rank, ZB-V for two in a V (first and last on rank 0)."""
    pp, v, layers = layout.pp, layout.virtual_stages, model.num_layers
    if schedule == "zb_h1" and v > 1:
        raise ConfigError(f"parallel.schedule=zb_h1 runs one model chunk per pipeline rank, got "
                          f"parallel.virtual_stages = {v}", "set parallel.virtual_stages=1")
    if schedule == "zbv" and v != 2:
        raise ConfigError(f"parallel.schedule=zbv runs two model chunks per pipeline rank, got "
                          f"parallel.virtual_stages = {v}", "set parallel.virtual_stages=2")
    if schedule == "zbv" and model.tie_embeddings:
        raise ConfigError("parallel.schedule=zbv holds the first and last chunk on one rank and "
                          "needs untied input and output embeddings, got model.tie_embeddings "
                          "= true", "set model.tie_embeddings=false")
    if v > 1 and pp == 1:
        raise ConfigError("parallel.virtual_stages > 1 interleaves model chunks over pipeline "
                          "ranks and needs parallel.pp > 1", "set parallel.virtual_stages=1")
    if layers % (pp * v):
        raise ConfigError(f"model.num_layers = {layers} is not divisible by parallel.pp * "
                          f"parallel.virtual_stages = {pp} * {v} = {pp * v}",
                          "change parallel.pp, parallel.virtual_stages or model.num_layers")
    if v > 1 and num_microbatches % pp and schedule != "zbv":
        raise ConfigError(
            f"interleaved pipelining (parallel.virtual_stages = {v}) needs the micro-batches per "
            f"step, m = train.global_batch_size / (train.micro_batch_size * dp) = "
            f"{num_microbatches}, to be a multiple of parallel.pp = {pp}",
            "change train.global_batch_size or train.micro_batch_size")


# ---- optimiser and learning-rate schedule -------------------------------------------------------
OPTIM_RULES = {
    "optim.name": choice("adamw"),
    "optim.lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.warmup_steps": NON_NEGATIVE_INT,
    "optim.decay_steps": or_null(POSITIVE_INT),
    "optim.schedule_unit": choice(*SCHEDULE_UNITS),
    "optim.beta1": FRACTION,
    "optim.beta2": FRACTION,
    "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.grad_clip": NON_NEGATIVE,  # 0: no clipping
}


def check_schedule(cfg: DictConfig) -> None:
    """Warm-up to lr over warmup_steps, cosine to min_lr until step decay_steps (nanomt.optim.
    schedule). An explicit decay_steps must end after the warm-up, or there is no decay, only a
    jump to min_lr. With decay_steps null the decay ends at train.steps, and a short run that
    ends inside the warm-up (a smoke test) is allowed."""
    check_fields(cfg, OPTIM_RULES)
    o = cfg.optim
    if o.decay_steps is not None and o.decay_steps <= o.warmup_steps:
        raise ConfigError(f"optim.decay_steps ({o.decay_steps}) must be greater than "
                          f"optim.warmup_steps ({o.warmup_steps}): the cosine decay ends at step "
                          f"decay_steps, counted from the start",
                          "raise optim.decay_steps, lower optim.warmup_steps, or set "
                          "optim.decay_steps=null (decay until train.steps)")


# ---- the training loop --------------------------------------------------------------------------
TRAIN_RULES = {
    "train.steps": POSITIVE_INT,
    "train.seed": INT,
    "train.precision": choice(*PRECISIONS),
    "train.fp32_grads": BOOL,
    "train.activation_checkpointing": choice(*CHECKPOINTING_MODES),
    "train.measure_memory": BOOL,
    "train.tf32": BOOL,
    "train.device": DEVICE,
    "train.eval_interval": NON_NEGATIVE_INT,  # 0: only at the end
    "train.eval_batches": POSITIVE_INT,       # the end-of-run validation always runs
    "train.resume": or_null(TEXT),
    "train.exit_after": or_null(POSITIVE_INT),
    "train.max_skipped_steps": NON_NEGATIVE_INT,
    "train.progress_bar": BOOL,
    "train.timeline": BOOL,
    "train.sample": BOOL,
    "train.sample_tokens": POSITIVE_INT,
    "train.sample_temperature": NON_NEGATIVE,
    "logging.log_interval": POSITIVE_INT,
    "logging.metrics_interval": POSITIVE_INT,  # steps per metrics record
    "logging.peak_tflops": or_null(POSITIVE),  # MFU's denominator (nanomt.flops)
    "checkpoint.dir": or_null(TEXT),
    "checkpoint.interval": NON_NEGATIVE_INT,  # 0: only on train.exit_after or SIGTERM
    "checkpoint.keep_last": NON_NEGATIVE_INT,  # 0: keep every checkpoint
    "checkpoint.on_error": choice("raise", "continue"),
}
LOSS_SCALE_RULES = {
    "train.loss_scale.initial": POSITIVE,
    "train.loss_scale.growth_interval": POSITIVE_INT,
    "train.loss_scale.min": POSITIVE,
}


def check_train(cfg: DictConfig) -> None:
    """Loop, checkpointing, preemption, device and the fp16 loss scale."""
    check_fields(cfg, TRAIN_RULES)
    preempt_signal(cfg)
    t = cfg.train
    if t.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={t.device} but no CUDA device is available",
                          "set train.device=auto or train.device=cpu")
    if t.precision == "fp16":
        check_fields(cfg, LOSS_SCALE_RULES)
        if t.loss_scale.min > t.loss_scale.initial:
            raise ConfigError(f"train.loss_scale.min ({t.loss_scale.min}) exceeds "
                              f"train.loss_scale.initial ({t.loss_scale.initial})",
                              "lower train.loss_scale.min or raise train.loss_scale.initial")


def preempt_signal(cfg: DictConfig) -> int:
    """train.preempt_signal as a signal number (a name such as SIGTERM or SIGUSR1)."""
    name = str(cfg.train.get("preempt_signal", "SIGTERM"))
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ConfigError(f"train.preempt_signal {name!r} is not a signal name",
                          "set train.preempt_signal to SIGTERM or SIGUSR1") from None


# ---- data (its files and tokenizer: nanomt.data.build.check_data) -------------------------------
DATA_RULES = {
    "data.name": TEXT,
    "data.tokenizer": TEXT,
    "data.val_fraction": OPEN_FRACTION,  # the end-of-run validation needs a validation split
    "data.cache_dir": or_null(TEXT),
    "data.path": or_null(TEXT),
}


# ---- everything ---------------------------------------------------------------------------------
def check_config(cfg: DictConfig, world_size: int) -> tuple[ModelConfig, Layout, int]:
    """The config's own rules. Returns (model, layout, micro-batches).

    Deterministic and cheap, reads no file: every rank runs it before the process group exists
    (preflight) and again in setup (nanomt.launch_checks.check_launch)."""
    check_train(cfg)
    model = model_config(cfg)
    layout = resolve_layout(cfg, world_size)
    check_model_fits_layout(model, layout)
    num_microbatches = check_batch(cfg, layout)
    check_pipeline(model, layout, num_microbatches, str(cfg.parallel.schedule))
    check_rampup_config(cfg.train.get("rampup_batch_size"), cfg.train.global_batch_size,
                        cfg.train.micro_batch_size, layout.dp, layout.pp, layout.virtual_stages)
    check_schedule(cfg)
    check_fields(cfg, DATA_RULES)
    return model, layout, num_microbatches
