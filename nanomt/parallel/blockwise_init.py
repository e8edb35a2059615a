"""Layout-independent initialisation: every rank draws only its own shard of each weight.

The full weight is defined slice by slice along the dim it is split along over tp: slice i (a
row, or a column of a row-parallel weight) comes from a generator seeded by (seed, parameter
path, i) alone, e.g. ("layers.3.mlp.fc1", 17). A rank draws just the slices of its shard, so no
rank ever materialises a full matrix, and with the same seed the model at any (tp, pp) holds
exactly the slices of the single-process model. The values depend on neither the layout nor the
device (CPU generators); the cost is one generator per slice, a few microseconds each.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def slice_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit generator seed private to slice `index` of the parameter `name`."""
    digest = hashlib.blake2b(f"{seed}/{name}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class NormalInit:
    """N(0, std) weights of the parameter (or module) at path `name`, drawn slice by slice."""

    std: float
    seed: int
    name: str

    def child(self, name: str) -> "NormalInit":
        """The same distribution for the sub-module or parameter `name`: its own streams."""
        return NormalInit(self.std, self.seed, f"{self.name}.{name}")

    def slices(self, shape: tuple[int, ...], dim: int, indices: range) -> torch.Tensor:
        """Slices `indices` along `dim` of the full tensor of `shape`, concatenated."""
        local_shape = list(shape)
        local_shape[dim] = len(indices)
        out = torch.empty(local_shape)
        if out.is_meta:
            return out  # built under torch.device("meta"): a shape, nothing to draw
        slice_shape = shape[:dim] + shape[dim + 1:]
        for local, index in enumerate(indices):
            generator = torch.Generator().manual_seed(slice_seed(self.seed, self.name, index))
            drawn = torch.empty(slice_shape).normal_(0.0, self.std, generator=generator)
            out.select(dim, local).copy_(drawn)
        return out


def vocab_shard(vocab_size: int, embedding_dim: int, rows: range,
                init: NormalInit) -> torch.Tensor:
    """`rows` of a vocabulary table [padded vocab, embedding_dim]: rows below `vocab_size` drawn
    by `init` (row i from its own stream), padding rows zero."""
    shard = torch.zeros(len(rows), embedding_dim)
    real = range(rows.start, max(rows.start, min(rows.stop, vocab_size)))
    shard[: len(real)] = init.slices((vocab_size, embedding_dim), dim=0, indices=real)
    return shard
