"""What a single configuration value may be: the rules `nanomt.config`'s tables are made of.

A `Rule` says what a value must be ("a positive integer", "one of 1f1b, gpipe"); `check_fields`
checks every key of a table against its rule and fails with `ConfigError(<key> must be <rule>,
got <value>; set <key>)`. `warn` prints a setting that works but does nothing useful, once.

The choices each subsystem offers are listed here, below every subsystem, so that the config
checks them without importing the subsystem, and the subsystem imports the same table. A key
whose rule a lower layer states itself (the grid's layout, ModelConfig's) is STATED_BELOW here:
the config only resolves it, then converts the lower layer's "what: fix" error.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanomt.errors import ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class Rule:
    """What a value must be: `text` completes "<key> must be ..."."""

    text: str
    test: Callable[[Any], bool]


def choice(*options: Any) -> Rule:
    return Rule("one of " + ", ".join(map(str, options)),
                lambda v: not isinstance(v, bool) and v in options)


def or_null(rule: Rule) -> Rule:
    return Rule(f"{rule.text} or null", lambda v: v is None or rule.test(v))


POSITIVE_INT = Rule("a positive integer", lambda v: _is_int(v) and v >= 1)
NON_NEGATIVE_INT = Rule("an integer >= 0", lambda v: _is_int(v) and v >= 0)
INT = Rule("an integer", _is_int)
POSITIVE = Rule("a number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE = Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)
FRACTION = Rule("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
OPEN_FRACTION = Rule("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1)
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and v != "")
STATED_BELOW = Rule("a value that resolves", lambda v: True)  # its rule: the lower layer's check
DEVICE = Rule("auto, cpu, cuda or cuda:<index>",
              lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None)

# ---- the choices the subsystems offer -----------------------------------------------------------
PRECISIONS = ("fp32", "bf16", "fp16")                 # train.precision
CHECKPOINTING_MODES = ("none", "selective", "full")   # train.activation_checkpointing (model)
SCHEDULES = ("1f1b", "gpipe", "zb_h1", "zbv")       # parallel.schedule (parallel.pipeline)
GRAD_REDUCE_MODES = ("microbatch", "step")            # parallel.grad_reduce (data_parallel)
SCHEDULE_UNITS = ("steps", "samples", "tokens")       # optim.schedule_unit (optim.schedule)

_ABSENT = object()


def check_fields(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    """Every key present in `cfg` meets its rule (keys a config lacks are left to their users)."""
    for key, rule in rules.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT)
        except OmegaConfBaseException as error:  # an interpolation that does not resolve
            reason = str(error).splitlines()[0]
            raise ConfigError(f"{key} cannot be resolved ({reason})", f"set {key}") from error
        if value is not _ABSENT and not rule.test(value):
            raise ConfigError(f"{key} must be {rule.text}, got {value!r}", f"set {key}")


_WARNED: set[str] = set()


def warn(message: str) -> None:
    """`nanomt: warning: <message>` on stderr, once per process, on global rank 0 only."""
    if message not in _WARNED and int(os.environ.get("RANK", "0")) == 0:
        print(f"nanomt: warning: {message}", file=sys.stderr, flush=True)
    _WARNED.add(message)


def as_config_error(error: Exception, key: str) -> ConfigError:
    """A lower layer's "what: fix" ValueError as "what; fix" (the fix must name `key`), keeping
    its type when it is a ConfigError already (CheckpointError)."""
    what, sep, fix = str(error).rpartition(": ")
    if not sep or key not in fix:
        what, fix = str(error), f"set {key}"
    return (type(error) if isinstance(error, ConfigError) else ConfigError)(what, fix)
