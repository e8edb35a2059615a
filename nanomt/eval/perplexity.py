"""Validation loss and perplexity of a checkpoint over a dataset.

    loss = -(1/N) sum_{n=1..N} log p(x_n | x_<n)   over every predicted token of the samples
    ppl  = exp(loss)

The samples are training's validation stream (nanomt.data: the run's own data and split, or the
indexed dataset eval.data_path names, split the same way): seq_len + 1 tokens each, the first
`num_samples` of the stream, so the loss here equals the run's val_loss over the same samples.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf

from nanomt.config import compose_config
from nanomt.data.build import build_stream
from nanomt.data.sampler import SampleStream, to_inputs_targets
from nanomt.eval.runner import ParallelLM


def validation_stream(run_config: dict | None, data_path: str | None, seq_len: int,
                      num_samples: int) -> SampleStream:
    """The validation split of the run's data (its saved config), or of `data_path`."""
    cfg: DictConfig = OmegaConf.create(run_config) if run_config else compose_config([])
    if data_path:
        cfg.data.path, cfg.data.blend = data_path, None
    return build_stream(cfg, "valid", seq_len, num_samples)


@torch.no_grad()
def dataset_loss(lm: ParallelLM, stream: SampleStream, num_samples: int,
                 batch_size: int = 8) -> dict[str, float]:
    """Mean token loss and perplexity over the first `num_samples` samples of `stream`; data-
    parallel replicas (dp * cp) take every replicas-th sample and the sums meet on every rank."""
    total = min(num_samples, len(stream))
    mine = lm.shard(range(total))
    loss_sum, count = 0.0, 0
    for b in range(lm.batch_count(total, batch_size)):
        batch = mine[b * batch_size:(b + 1) * batch_size]
        inputs, targets = to_inputs_targets([stream[i] for i in batch or [0]])
        log_probs = lm.log_probs(inputs).cpu()
        if batch:  # past my share: a stand-in forward (lm.batch_count), not counted
            loss_sum -= float(log_probs.gather(-1, targets.unsqueeze(-1)).double().sum())
            count += targets.numel()
    parts = lm.gather((loss_sum, count))
    loss_sum, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    loss = loss_sum / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}
