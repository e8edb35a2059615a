"""Naming a failed collective: which operation, on which group, this rank was in.

When a rank stalls or dies, its peers' pending operation fails (gloo: after the group's
timeout; NCCL: its watchdog) with the backend's own words, which name neither the operation
nor the group. So every collective in nanomt notes what it enters (`note_operation`, one
assignment), the grid names its groups (`name_group`: tp, cp, pp, dp, grad_sync, embedding,
model_parallel; None and the default group are "world"), and `describe_failure` turns the
error into one line: "<operation> on the <group> group failed during <when>: <cause>".
"""

from __future__ import annotations

import torch.distributed as dist

_GROUP_NAMES: dict[int, str] = {}
LAST_OPERATION: tuple[str, str] | None = None  # (kind, group name) this rank entered last


def name_group(group: dist.ProcessGroup | None, name: str) -> None:
    """Call `group` by `name` in failure messages."""
    if group is not None:
        _GROUP_NAMES[id(group)] = name


def group_name(group: dist.ProcessGroup | None) -> str:
    if group is None or group is dist.group.WORLD:
        return "world"
    return _GROUP_NAMES.get(id(group), "unnamed")


def note_operation(kind: str, group: dist.ProcessGroup | None) -> None:
    """Remember that this rank entered `kind` on `group` (also for operations issued outside
    comm: point-to-point batches, waits on asynchronous work)."""
    global LAST_OPERATION
    LAST_OPERATION = (kind, group_name(group))


def is_communication_failure(error: BaseException) -> bool:
    """True for the errors a failed or timed-out collective raises (gloo, NCCL, the store)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "NCCL", "Timed out", "Connection reset",
                                      "Connection closed", "ProcessGroup"))


def describe_failure(error: BaseException, when: str) -> str:
    """'<operation> on the <group> group failed during <when>: <the backend's first sentence>'."""
    kind, group = LAST_OPERATION or ("a collective", "unknown")
    detail = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    if detail.startswith("[") and "] " in detail:  # gloo's "[/path/to/file.cc:123] " prefix
        detail = detail.split("] ", 1)[1]
    detail = detail.split(". ", 1)[0].rstrip(".")
    return f"{kind} on the {group} group failed during {when}: {detail[:160]}"
