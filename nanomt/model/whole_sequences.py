"""Running a sequence- or context-parallel model on whole sequences, for generation and scoring.

A sequence that grows one token at a time, or a prompt of any length, cannot be split over tp
(sequence parallelism) or cp (context parallelism). Neither split changes the function the model
computes, so `on_whole_sequences` switches both off for a block: every tp rank then holds the
whole sequence (all-reduces where SP has reduce-scatters and all-gathers), and every cp rank
runs it with plain attention (the cp ranks hold the same weights, so they compute the same).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def on_whole_sequences(chunks: list[nn.Module]) -> Iterator[None]:
    """Inside the block, the chunks run without sequence and context parallelism."""
    split = [m for chunk in chunks for m in chunk.modules()
             if getattr(m, "sequence_parallel", False)]
    context = [(m, m.cp_rank, m.cp_size) for chunk in chunks for m in chunk.modules()
               if getattr(m, "cp_size", 1) > 1]
    for module in split:
        module.sequence_parallel = False
    for module, _, _ in context:
        module.cp_rank, module.cp_size = 0, 1
    try:
        yield
    finally:
        for module in split:
            module.sequence_parallel = True
        for module, rank, size in context:
            module.cp_rank, module.cp_size = rank, size
