"""The GPT decoder: embedding -> transformer layers -> final norm -> vocab-parallel head and loss.

Plain PyTorch around tensor-parallel parts. The same class builds
  - the whole model on one process (grid=None: every parallel piece is an ordinary layer),
  - one tensor-parallel shard of it (grid.tp_size > 1),
  - one pipeline chunk of it: `layer_range` picks the layers, `pre_process` adds the embedding
    (first chunk) and `post_process` the head and loss (last chunk),
  - one context-parallel share of it (grid.cp_size > 1): every rank holds two chunks of each
    sequence, and positions and attention follow (nanomt.parallel.context_parallel).

Weights are N(0, init_std), drawn blockwise so that any layout holds exactly the slices of the
single-process model (nanomt.parallel.blockwise_init); the two output projections of each layer
use init_std / sqrt(2 * num_layers), as in GPT-2 and Megatron; biases start at zero, and so do
the embedding's padding rows.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from nanomt.model.config import ModelConfig
from nanomt.model.kv_cache import KVCache
from nanomt.model.layers import TransformerLayer, make_norm
from nanomt.model.param_records import describe_parameters
from nanomt.parallel import comm
from nanomt.parallel.blockwise_init import NormalInit
from nanomt.parallel.context_parallel import local_positions
from nanomt.parallel.cross_entropy import vocab_parallel_cross_entropy
from nanomt.parallel.deferred_init import new_parameter
from nanomt.parallel.random import TensorParallelRNG
from nanomt.parallel.tensor_parallel import (
    VocabParallelEmbedding,
    VocabParallelOutput,
    parallel_lm_logits,
)


class GPT(nn.Module):
    """A GPT decoder, or the tensor/pipeline-parallel piece of one held by this rank."""

    def __init__(self, cfg: ModelConfig, grid=None, *, seed: int = 1234,
                 sequence_parallel: bool = False, layer_range: range | None = None,
                 pre_process: bool = True, post_process: bool = True):
        super().__init__()
        self.cfg = cfg
        self.tp_group = grid.tp_group if grid is not None else None
        self.tp_rank, self.tp_size = comm.rank_and_size(self.tp_group)
        self.cp_group = grid.cp_group if grid is not None else None
        self.cp_rank, self.cp_size = comm.rank_and_size(self.cp_group)
        self.ep_group = grid.ep_group if grid is not None else None
        self.ep_rank, self.ep_size = comm.rank_and_size(self.ep_group)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.padded_vocab_size = cfg.padded_vocab_size(self.tp_size)
        self.layer_range = layer_range if layer_range is not None else range(cfg.num_layers)
        self.pre_process, self.post_process = pre_process, post_process
        # One stream per chunk (named by its first layer): stages draw different masks.
        self.rng = TensorParallelRNG(seed, self.tp_rank, stream=self.layer_range.start)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)

        if pre_process or (post_process and cfg.tie_embeddings):
            # The last pipeline stage keeps its own copy of a tied word embedding; the two copies
            # start equal and the embedding group sums their gradients every step.
            self.word_embedding = VocabParallelEmbedding(
                cfg.vocab_size, self.padded_vocab_size, cfg.hidden_size, self.tp_group,
                NormalInit(std, seed, "word_embedding"), sequence_parallel=self.sequence_parallel)
        if pre_process and cfg.style == "gpt":
            shape = (cfg.seq_len, cfg.hidden_size)
            self.initializers = {"position_embedding": partial(
                NormalInit(std, seed, "position_embedding").slices, shape, 0, range(shape[0]))}
            self.position_embedding = new_parameter(self.initializers["position_embedding"],
                                                    shape)  # replicated over tp
        self.layers = nn.ModuleList(
            TransformerLayer(cfg, self.tp_group, NormalInit(std, seed, f"layers.{i}"),
                             NormalInit(out_std, seed, f"layers.{i}"), self.sequence_parallel,
                             self.rng, self.cp_group, layer=i, ep_group=self.ep_group)
            for i in self.layer_range)
        if post_process:
            self.final_norm = make_norm(cfg)
            if not cfg.tie_embeddings:
                self.output_layer = VocabParallelOutput(
                    cfg.vocab_size, self.padded_vocab_size, cfg.hidden_size, self.tp_group,
                    NormalInit(std, seed, "output_layer"))
        describe_parameters(self)

    # ---- pieces of forward -------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens [b, s] at positions start.. -> hidden [s, b, h] (or [s/t, b, h] under sequence
        parallelism); start > 0 when earlier tokens sit in a KV cache. The one transpose of the
        forward: looking up tokens.t() gives [s, b, h] directly."""
        hidden = self.word_embedding(tokens.t())  # under SP already reduce-scattered
        if self.cfg.style == "gpt":
            positions = self.position_embedding[start: start + tokens.shape[1]]
            if self.cp_size > 1:  # this rank's two chunks of the sequence
                positions = self.position_embedding[local_positions(
                    tokens.shape[1] * self.cp_size, self.cp_rank, self.cp_size, tokens.device)]
            if self.sequence_parallel:  # the positions of my sequence shard
                positions = positions.chunk(self.tp_size, dim=0)[self.tp_rank]
            hidden = hidden + positions.unsqueeze(1)  # [s, 1, h]: the same for every sequence
        if self.training and self.cfg.dropout > 0:
            if self.sequence_parallel:
                with self.rng.fork():
                    return F.dropout(hidden, self.cfg.dropout, training=True)
            hidden = F.dropout(hidden, self.cfg.dropout, training=True)
        return hidden

    def output_weight(self) -> torch.Tensor:
        """The [V_padded / t, h] weight of the head: the word embedding when tied."""
        if self.cfg.tie_embeddings:
            return self.word_embedding.weight
        return self.output_layer.weight

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h] -> logits for this rank's vocabulary shard [s, b, V_padded / t]."""
        hidden = self.final_norm(hidden)
        return parallel_lm_logits(hidden, self.output_weight(), self.tp_group,
                                  self.sequence_parallel)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """First chunk takes token ids, later chunks the previous chunk's hidden state.

        Returns the hidden state [s, b, h] (not the last chunk), the local logits shard
        [b, s, V_padded / t] (last chunk, no targets; a transposed view) or the mean
        cross-entropy loss over all tokens (last chunk, with targets [b, s]).
        With a KV cache (generation) `inputs` are only the new tokens, after `cache.length`
        cached ones.
        """
        start = cache.length if cache is not None else 0
        hidden = self.embed(inputs, start) if self.pre_process else inputs
        for index, layer in zip(self.layer_range, self.layers):
            hidden = layer(hidden, cache.layer(index) if cache is not None else None)
        if not self.post_process:
            return hidden
        logits = self.head(hidden)
        if targets is None:
            return logits.transpose(0, 1)
        return vocab_parallel_cross_entropy(logits, targets.t(), self.tp_group,
                                            self.cfg.vocab_size).mean()

    def num_local_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
