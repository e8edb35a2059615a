"""Sharded, atomic, layout-independent checkpoints (see docs/checkpoints.md)."""

from nanomt.checkpoint.format import CheckpointError
from nanomt.checkpoint.load import (
    CheckpointReader,
    find_resume_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
)
from nanomt.checkpoint.save import PreemptionSignal, list_checkpoints, save_checkpoint

__all__ = ["CheckpointError", "CheckpointReader", "PreemptionSignal", "find_resume_checkpoint",
           "list_checkpoints", "load_checkpoint", "resolve_checkpoint", "save_checkpoint"]
