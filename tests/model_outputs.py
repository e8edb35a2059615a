"""What a model computes, read whole for the tests: the logits over the full vocabulary.

A tensor-parallel GPT's forward returns this rank's vocabulary shard [b, s, V_padded / t]
(Shoeybi et al. 2019, section 3: the output embedding is split along the vocabulary); gathering
the shards over tp and dropping the padding columns gives the single-process model's [b, s, V].
"""

from __future__ import annotations

import torch

from nanomt.model import GPT
from nanomt.parallel import comm


@torch.no_grad()
def full_logits(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    """Whole-vocabulary logits [b, s, V] of a model that holds the whole pipeline (gathered over
    tp, padding removed). Collective over the model's tp group."""
    logits = comm.all_gather(model(tokens), model.tp_group, dim=-1)
    return logits[..., : model.cfg.vocab_size]
