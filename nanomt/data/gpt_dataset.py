"""GPT training samples over an indexed corpus: windows of seq_len + 1 tokens across documents.

An epoch lays the split's documents end to end in an order shuffled with (seed, epoch) and cuts
the stream into samples; sample j of an epoch is tokens [j*s, j*s + s + 1) of it (s = seq_len),
so neighbours share one token (the last target of one is the first input of the next) and a
sample may run over document boundaries. With T tokens in the split an epoch has
(T - 1) // s samples and drops fewer than s tokens at its end. The samples of each epoch are
then shuffled, again with (seed, epoch), and the epochs follow one another:

    stream position i  ->  shuffle[i] = (epoch e, sample j)  ->  sample_starts[.] = (document
                           position in doc_index, token offset)  ->  s + 1 tokens read from .bin

Three index arrays say all this (Megatron's document, sample and shuffle indices), built with
numpy in a few vectorised passes per epoch (a searchsorted of the sample starts into the
cumulative document lengths; no Python loop per token or per sample), cached as .npy files
next to the data (nanomt.data.cache) and memory-mapped. An epoch does not depend on how many
epochs are built, so asking for more samples extends the stream without changing its start.

Splits are by documents (Megatron's `split`, e.g. "969,30,1"): the documents are cut into
contiguous train / validation / test ranges in proportion to the weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nanomt.data.cache import IndexCache, file_digest
from nanomt.data.indexed import IndexedDataset, index_file

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str | list | tuple) -> list[float]:
    """"969,30,1" (or a list) -> three non-negative weights summing to 1."""
    parts = split.replace("/", ",").split(",") if isinstance(split, str) else list(split)
    weights = [float(p) for p in parts]
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"a split is up to three non-negative weights with a positive sum, "
                         f"got {split!r}")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def split_ranges(num_documents: int, weights: list[float]) -> list[tuple[int, int]]:
    """Contiguous document ranges [lo, hi) per split: each part rounded, the last boundary
    moved back to num_documents (the rule Megatron's builder uses)."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [0] + [max(0, b - excess) for b in bounds[1:]]
    return list(zip(bounds[:-1], bounds[1:]))


def _epoch_rng(seed: int, epoch: int, what: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, what]))


def build_sample_indices(lengths: np.ndarray, seq_len: int, num_samples: int, seed: int
                         ) -> dict[str, np.ndarray]:
    """doc_index, sample_starts [n, 2] (position in doc_index, offset) and shuffle for
    documents of `lengths` tokens (positions 0..D-1 of the split)."""
    num_docs, total = len(lengths), int(lengths.sum())
    per_epoch = (total - 1) // seq_len if total else 0
    if per_epoch < 1:
        raise ValueError(f"{total} tokens cannot fill one sample of seq_len + 1 = "
                         f"{seq_len + 1} tokens")
    epochs = max(1, math.ceil(num_samples / per_epoch))
    doc_index = np.empty(epochs * num_docs, dtype=np.int64)
    starts = np.empty((epochs * per_epoch, 2), dtype=np.int64)
    shuffle = np.empty(epochs * per_epoch, dtype=np.int64)
    token_starts = np.arange(per_epoch, dtype=np.int64) * seq_len
    for e in range(epochs):
        order = _epoch_rng(seed, e, 0).permutation(num_docs)
        doc_index[e * num_docs:(e + 1) * num_docs] = order
        ends = np.cumsum(lengths[order])  # first token after each document
        position = np.searchsorted(ends, token_starts, side="right")  # skips empty documents
        before = np.concatenate([[0], ends])[position]
        starts[e * per_epoch:(e + 1) * per_epoch, 0] = e * num_docs + position
        starts[e * per_epoch:(e + 1) * per_epoch, 1] = token_starts - before
        shuffle[e * per_epoch:(e + 1) * per_epoch] = (e * per_epoch
                                                      + _epoch_rng(seed, e, 1).permutation(
                                                          per_epoch))
    return {"doc_index": doc_index, "sample_starts": starts, "shuffle": shuffle[:num_samples],
            "samples_per_epoch": np.array([per_epoch])}


class GPTDataset:
    """`num_samples` samples of seq_len + 1 tokens from documents [lo, hi) of an indexed corpus.

    `dataset[i]` is the i-th sample of the shuffled stream (int64 numpy array)."""

    ARRAYS = ["doc_index", "sample_starts", "shuffle", "samples_per_epoch"]

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int], seq_len: int,
                 num_samples: int, seed: int, cache_dir: str | Path | None = None,
                 split: str = "train") -> None:
        self.indexed, self.seq_len, self.num_samples = indexed, seq_len, num_samples
        lo, hi = document_range
        if hi <= lo:
            raise ValueError(f"the {split} split of {indexed.prefix} has no documents")
        self.first_document = lo
        folder = Path(cache_dir) if cache_dir else indexed.prefix.parent / "cache"
        description = {"kind": "gpt", "index_sha256": file_digest(index_file(indexed.prefix)),
                       "documents": [lo, hi], "seq_len": seq_len, "num_samples": num_samples,
                       "seed": seed}
        self.cache = IndexCache(folder, f"{indexed.prefix.name}.{split}", description)
        lengths = indexed.document_lengths[lo:hi]
        arrays = self.cache.get(self.ARRAYS, lambda: build_sample_indices(
            lengths, seq_len, num_samples, seed))
        self.doc_index, self.sample_starts = arrays["doc_index"], arrays["sample_starts"]
        self.shuffle = arrays["shuffle"]
        self.samples_per_epoch = int(arrays["samples_per_epoch"][0])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} is outside this dataset's {self.num_samples} samples")
        position, offset = (int(v) for v in self.sample_starts[self.shuffle[i]])
        need, pieces = self.seq_len + 1, []
        while need > 0:  # a few documents at most, unless documents are tiny
            doc = self.first_document + int(self.doc_index[position])
            piece = self.indexed.document(doc, offset, need)
            pieces.append(piece)
            need -= len(piece)
            position, offset = position + 1, 0
        return np.concatenate(pieces).astype(np.int64)
