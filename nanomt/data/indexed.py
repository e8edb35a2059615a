"""Indexed token files: the `.bin` + `.idx` pair Megatron-LM reads, written and memory-mapped.

A corpus is stored under a *prefix* (a path without extension) as two files:

    PREFIX.bin   every document's token ids, back to back, in one dtype, nothing else
    PREFIX.idx   where each document starts and how long it is:

        offset  size          field
        0       9             magic b"MMIDIDX\\x00\\x00"
        9       8   <Q        version, 1
        17      1   <B        dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                              6 float64, 7 float32, 8 uint16
        18      8   <Q        N, the number of sequences
        26      8   <Q        D + 1, the length of the document index
        34      4 N  int32    sequence lengths, in tokens
        ..      8 N  int64    sequence pointers: byte offset of each sequence in .bin
        ..      8 (D+1) int64 document index: document d is sequences [idx[d], idx[d+1]);
                              idx[0] = 0 and idx[D] = N

Megatron lets a document hold several sequences (sentences); nanomt writes one sequence per
document, so N = D and the document index is 0, 1, ..., N; it reads either. Both files are
opened with `numpy.memmap`: opening costs the header, not the corpus, and a token is read from
disk only when a sample needs it.
"""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document index length
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}


class IndexedFormatError(ValueError):
    """A `.bin` / `.idx` pair that is missing, truncated or not in the indexed format."""


def data_file(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def index_file(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def smallest_dtype(vocab_size: int) -> np.dtype:
    """uint16 below 65,500 ids (Megatron's threshold), else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def dtype_holds(dtype: np.dtype, vocab_size: int) -> bool:
    """Can `dtype` store every id in [0, vocab_size)?"""
    dtype = np.dtype(dtype)
    return dtype.kind in "iu" and vocab_size - 1 <= np.iinfo(dtype).max


class IndexedWriter:
    """Stream documents into PREFIX.bin; `finish()` writes PREFIX.idx.

    Token ids go to disk as they come (constant memory); only the lengths, 4 bytes per
    document, stay in memory until the index is written. Both files are written under temporary
    names and renamed at the end, so a crash never leaves a pair that looks complete.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no code in the indexed format")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = Path(f"{self.prefix}.bin.tmp{os.getpid()}")
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []
        self.num_tokens = 0

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        self.add_documents([np.asarray(tokens)])

    def add_documents(self, documents: list[np.ndarray]) -> None:
        """Append documents (1-D arrays of ids)."""
        if documents:
            lengths = np.fromiter((len(d) for d in documents), np.int64, len(documents))
            self.add_batch(np.concatenate([np.asarray(d) for d in documents]), lengths)

    def add_batch(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their ids back to back and their lengths."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(ids):
            raise ValueError(f"lengths sum to {int(lengths.sum())}, but {len(ids)} ids given")
        if lengths.max(initial=0) > np.iinfo(np.int32).max:
            raise ValueError("a document is longer than 2**31 - 1 tokens")
        self._bin.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths.astype(np.int32))
        self.num_tokens += len(ids)

    def finish(self) -> tuple[Path, Path]:
        """Close .bin, write .idx, rename both into place; returns (bin, idx)."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        tmp_idx = Path(f"{self.prefix}.idx.tmp{os.getpid()}")
        write_index(tmp_idx, lengths, self.dtype)
        os.replace(self._tmp_bin, data_file(self.prefix))
        os.replace(tmp_idx, index_file(self.prefix))
        return data_file(self.prefix), index_file(self.prefix)


def write_index(path: Path, lengths: np.ndarray, dtype: np.dtype,
                document_index: np.ndarray | None = None) -> None:
    """The .idx file for sequences of `lengths` tokens (one sequence per document by default)."""
    lengths = np.asarray(lengths, dtype=np.int32)
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    if document_index is None:
        document_index = np.arange(n + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[np.dtype(dtype)], n,
                            len(document_index)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.asarray(document_index, dtype=np.int64).tobytes())


def read_header(path: Path) -> tuple[np.dtype, int, int]:
    """(dtype, sequences, document index length) of an .idx file, checking magic and version."""
    if not path.is_file():
        raise IndexedFormatError(f"index file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise IndexedFormatError(f"{path} is truncated: {len(raw)} bytes, shorter than the "
                                 f"{HEADER.size}-byte header")
    magic, version, code, n, d = HEADER.unpack(raw)
    if magic != MAGIC:
        raise IndexedFormatError(f"{path} is not an indexed dataset index: magic {magic!r}, "
                                 f"expected {MAGIC!r}")
    if version != VERSION:
        raise IndexedFormatError(f"{path} has index version {version}; only version "
                                 f"{VERSION} is supported")
    if code not in DTYPE_CODES:
        raise IndexedFormatError(f"{path} has unknown dtype code {code}")
    return np.dtype(DTYPE_CODES[code]), n, d


class IndexedDataset:
    """A memory-mapped `.bin` / `.idx` pair: documents of token ids, read by slicing.

    Checks on opening (cheap, no token is read): the header, that .idx is exactly as long as
    its header says, that .bin holds every token the index points at, and that the document
    index runs from 0 to the sequence count.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx, bin_ = index_file(prefix), data_file(prefix)
        self.dtype, n, d = read_header(idx)
        expected = HEADER.size + 12 * n + 8 * d
        actual = idx.stat().st_size
        if actual != expected:
            kind = "truncated" if actual < expected else "longer than its header says"
            raise IndexedFormatError(f"{idx} is {kind}: {actual} bytes, expected {expected} "
                                     f"for {n} sequences")
        index = np.memmap(idx, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(index, np.int32, n, HEADER.size)
        self.sequence_pointers = np.frombuffer(index, np.int64, n, HEADER.size + 4 * n)
        self.document_index = np.frombuffer(index, np.int64, d, HEADER.size + 12 * n)
        if d < 1 or self.document_index[0] != 0 or self.document_index[-1] != n:
            raise IndexedFormatError(f"{idx}: the document index must run from 0 to the "
                                     f"sequence count {n}")
        if not bin_.is_file():
            raise IndexedFormatError(f"data file not found: {bin_}")
        needed = (int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1])
                  * self.dtype.itemsize) if n else 0
        if bin_.stat().st_size < needed:
            raise IndexedFormatError(f"{bin_} is truncated: {bin_.stat().st_size} bytes, the "
                                     f"index points up to byte {needed}")
        self.tokens = (np.memmap(bin_, mode="r", dtype=self.dtype) if bin_.stat().st_size
                       else np.zeros(0, self.dtype))

    @property
    def num_documents(self) -> int:
        return len(self.document_index) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @functools.cached_property
    def document_lengths(self) -> np.ndarray:
        """Tokens per document (int64), summing a document's sequences."""
        if len(self.sequence_lengths) == self.num_documents:  # one sequence per document
            return self.sequence_lengths.astype(np.int64)
        ends = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return np.diff(ends[self.document_index])

    @functools.cached_property
    def document_starts(self) -> np.ndarray:
        """Token offset of each document's first token in .bin (int64)."""
        if not len(self.sequence_pointers):
            return np.zeros(self.num_documents, np.int64)
        first = np.minimum(self.document_index[:-1], len(self.sequence_pointers) - 1)
        return self.sequence_pointers[first] // self.dtype.itemsize

    def document(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document `doc` (a view into the mapped .bin)."""
        start, size = int(self.document_starts[doc]), int(self.document_lengths[doc])
        stop = size if length is None else min(size, offset + length)
        return self.tokens[start + offset:start + stop]
