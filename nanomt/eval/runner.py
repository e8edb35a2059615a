"""A checkpoint's model under any (tp, pp, dp) layout, answering whole-model questions.

Evaluation and generation need the full next-token distribution at every position, on every
rank. Training's pipeline schedules return only a loss, so inference walks the chunks in model
order, one forward each:

    h_0 = tokens;  h_{k+1} = chunk_k(h_k)  on pipeline rank k mod p, broadcast to the pp group
    logits = all-gather of the last chunk's vocabulary shards over tp (padding rows dropped)

Every rank of a model replica then holds the same [b, s, V] logits, so sampling and scoring
need no further agreement.

Sequence and context parallelism split a forward's activations, not its function: inference runs
every forward on whole sequences (nanomt.model.whole_sequences), since a prompt of any
length, or a sequence growing one token at a time, cannot be split. Each cp rank then holds the
whole replica (its weights are the same as its cp peers'), so the dp x cp ranks of a (tp, pp)
position are dp * cp replicas that score different examples (`shard`), each running as many
forwards as the others (`batch_count`: ZeRO-3 gathers the weights over all of them in each one).

Weights come from any checkpoint through nanomt.checkpoint's resharding load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch

from nanomt.checkpoint import load_checkpoint, resolve_checkpoint
from nanomt.checkpoint.load import read_meta
from nanomt.data.tokenizer import Tokenizer, build_tokenizer
from nanomt.model import GPT, ModelConfig
from nanomt.model.chunks import build_model_chunks
from nanomt.model.whole_sequences import on_whole_sequences
from nanomt.model.kv_cache import KVCache
from nanomt.parallel import comm
from nanomt.parallel.grid import ParallelGrid

T = TypeVar("T")


class ParallelLM:
    """This rank's chunks of one model replica, the grid, and the model's tokenizer."""

    def __init__(self, chunks: list[GPT], grid: ParallelGrid | None, tokenizer: Tokenizer):
        self.chunks, self.grid, self.tokenizer = chunks, grid, tokenizer
        self.cfg: ModelConfig = chunks[0].cfg
        self.device = next(chunks[0].parameters()).device
        self.dtype = next(chunks[0].parameters()).dtype
        for chunk in chunks:
            chunk.eval()
        # Which pipeline rank holds global chunk k, as which of its chunks (interleaved, or in
        # ZB-V's V: nanomt.parallel.pipeline.partition), gathered from every rank's layers.
        mine = torch.tensor([[c.layer_range.start // len(c.layer_range) for c in chunks]],
                            device=self.device)
        every = comm.all_gather(mine, grid.pp_group if grid is not None else None, dim=0)
        self.place = {k: (rank, local) for rank, row in enumerate(every.tolist())
                      for local, k in enumerate(row)}

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    def _stage_output(self, k: int, inputs: torch.Tensor, tokens: torch.Tensor,
                      cache: KVCache | None) -> torch.Tensor:
        """Global chunk k on its owner; everyone else receives the result by broadcast."""
        grid, last = self.grid, len(self.chunks) * self._pp() - 1
        owner, local = self.place[k]
        b, s = tokens.shape
        if grid is None or grid.pp_rank == owner:
            out = self.chunks[local](inputs, cache=cache)
            if k == last:
                tp_group = grid.tp_group if grid is not None else None
                out = comm.all_gather(out, tp_group, dim=-1)[..., : self.cfg.vocab_size]
            out = out.float() if k == last else out
        else:
            shape = (b, s, self.cfg.vocab_size) if k == last else (s, b, self.cfg.hidden_size)
            out = torch.empty(shape, device=self.device,
                              dtype=torch.float32 if k == last else self.dtype)
        if grid is not None and grid.pp_size > 1:
            out = comm.broadcast(out.contiguous(), grid.pp_ranks[owner], grid.pp_group)
        return out

    def _pp(self) -> int:
        return self.grid.pp_size if self.grid is not None else 1

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [b, s] -> fp32 logits [b, s, V] over the real vocabulary, on every rank. With a
        cache, `tokens` follow the `cache.length` tokens already in it, and it grows by s."""
        tokens = tokens.to(self.device)
        hidden = tokens
        with on_whole_sequences(self.chunks):
            for k in range(len(self.chunks) * self._pp()):
                hidden = self._stage_output(k, hidden, tokens, cache)
        if cache is not None:
            cache.advance(tokens.shape[1])
        return hidden

    @torch.no_grad()
    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(next token | prefix) [b, s, V] at every position."""
        return torch.log_softmax(self.logits(tokens), dim=-1)

    @property
    def replicas(self) -> int:
        """Model replicas that split the examples: dp * cp."""
        return 1 if self.grid is None else self.grid.dp_size * self.grid.cp_size

    def shard(self, items: Sequence[T]) -> list[T]:
        """The items this replica handles (every replicas-th, from its place among them)."""
        if self.replicas == 1:
            return list(items)
        place = self.grid.dp_rank * self.grid.cp_size + self.grid.cp_rank  # dp x cp order
        return list(items[place::self.replicas])

    def batch_count(self, total: int, batch_size: int) -> int:
        """Forwards every replica runs over its share of `total` items (the largest share's; a
        replica past its own share runs a stand-in batch and drops it)."""
        return math.ceil(math.ceil(total / self.replicas) / batch_size)

    def gather(self, value: T) -> list[T]:
        """Every replica's `value`, in replica order, on every rank."""
        if self.replicas == 1:
            return [value]
        return comm.all_gather_object(value, self.grid.grad_sync_group)

    def unshard(self, mine: list[T], total: int) -> list[T]:
        """Inverse of `shard`: every replica's results in the original order, on every rank."""
        if self.replicas == 1:
            return mine
        out: list = [None] * total
        for place, part in enumerate(self.gather(mine)):
            out[place::self.replicas] = part
        return out


def checkpoint_meta(path: str | Path) -> dict:
    """meta.json of the checkpoint at `path` (a step folder or a root with `latest`)."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    meta["folder"] = str(folder)
    return meta


def checkpoint_tokenizer(meta: dict, override: str | None = None) -> Tokenizer:
    """The tokenizer the run trained with (its data.tokenizer), unless `override` names one."""
    spec = override or meta.get("config", {}).get("data", {}).get("tokenizer", "byte")
    return build_tokenizer(spec)


def load_parallel_lm(path: str | Path, grid: ParallelGrid | None, virtual_stages: int = 1,
                     device: torch.device | str = "cpu", tokenizer: str | None = None,
                     sequence_parallel: bool = False) -> ParallelLM:
    """Build this rank's chunks for the checkpoint's model (as training builds them for the
    grid's layout) and read its slices into them."""
    meta = checkpoint_meta(path)
    cfg = ModelConfig.from_dict(meta["model"])
    chunks = build_model_chunks(cfg, grid, virtual_stages, sequence_parallel=sequence_parallel,
                                device=device)
    load_checkpoint(meta["folder"], chunks, None, grid, cfg.to_dict())
    return ParallelLM(chunks, grid, checkpoint_tokenizer(meta, tokenizer))
