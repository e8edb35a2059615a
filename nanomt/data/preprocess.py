"""Raw text to an indexed token file (nanomt.data.indexed), streaming, with worker processes.

    documents -> batches of about 1 MB of text -> N workers tokenize -> one writer, in order

What a document is:
    JSON lines (.jsonl, .json, optionally .gz / .xz): one document per line, the text under
        `json_key` ("text"), as Megatron's preprocess_data.py reads them.
    any other text file (.txt, .txt.gz, .txt.xz, ...): documents are paragraphs, a run of
        lines ended by one or more blank lines, the blank lines kept with the paragraph (so the
        documents put back together are the file, byte for byte); a paragraph longer than
        MAX_DOCUMENT_CHARS is cut at a line boundary so memory stays bounded.

Memory is constant whatever the input size: at most 2 * workers batches are in flight, and
the writer keeps only 4 bytes per document (its length) until the index is written. Output is
the same for any number of workers (batches are written in input order).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import lzma
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nanomt.data.indexed import IndexedWriter, smallest_dtype
from nanomt.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer

BATCH_CHARS = 1 << 20          # text per work item
MAX_DOCUMENT_CHARS = 8 << 20   # a longer paragraph is cut at a line boundary
JSON_SUFFIXES = (".jsonl", ".json")


def open_text(path: Path) -> io.TextIOBase:
    """A text stream over a file, decompressing .gz and .xz."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def is_json_lines(path: Path) -> bool:
    suffixes = path.suffixes[-2:] if path.suffix in (".gz", ".xz") else path.suffixes[-1:]
    return bool(suffixes) and suffixes[0] in JSON_SUFFIXES


def paragraphs(lines: Iterator[str]) -> Iterator[str]:
    """Split a stream of lines into paragraphs that keep their trailing blank lines."""
    current: list[str] = []
    size, in_blank_run = 0, False
    for line in lines:
        blank = line.strip() == ""
        if current and ((in_blank_run and not blank) or size >= MAX_DOCUMENT_CHARS):
            yield "".join(current)
            current, size = [], 0
        current.append(line)
        size += len(line)
        in_blank_run = blank
    if current:
        yield "".join(current)


def iter_documents(path: Path, json_key: str = "text") -> Iterator[str]:
    """The documents of one input file (see the module docstring)."""
    with open_text(path) as stream:
        if not is_json_lines(path):
            yield from paragraphs(stream)
            return
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if json_key not in record:
                raise KeyError(f"{path}:{number}: no key {json_key!r} (set --json-key)")
            yield record[json_key]


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths or glob patterns, sorted within each pattern, in the given order."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise FileNotFoundError(f"no input file matches {pattern!r}")
        files.extend(Path(m) for m in matches if Path(m).is_file())
    return files


def batches(files: list[Path], json_key: str) -> Iterator[list[str]]:
    """Documents of every file, grouped into lists of about BATCH_CHARS characters."""
    batch: list[str] = []
    size = 0
    for path in files:
        for doc in iter_documents(path, json_key):
            batch.append(doc)
            size += len(doc)
            if size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text; bytes are a zero-copy view, BPE goes through `encode_batch`."""
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]
    return [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]


# -- worker processes: each builds its own tokenizer once ------------------------------------
_WORKER: dict = {}


def _init_worker(spec: str, eod: int | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _WORKER.update(tokenizer=build_tokenizer(spec), eod=eod)


def _encode_work(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(all ids, per-document lengths, UTF-8 bytes read) of one batch: compact to pickle."""
    docs = encode_batch(_WORKER["tokenizer"], texts)
    if _WORKER["eod"] is not None:
        docs = [np.append(d, _WORKER["eod"]) for d in docs]
    lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
    ids = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    return ids, lengths, sum(len(t.encode("utf-8")) for t in texts)


@dataclass
class PreprocessSummary:
    files: int
    documents: int
    tokens: int
    input_bytes: int
    seconds: float
    dtype: str
    output_prefix: str

    def line(self) -> str:
        mb = self.input_bytes / 1e6
        return (f"{self.documents:,} documents, {self.tokens:,} tokens ({self.dtype}) from "
                f"{self.files} file(s), {mb:,.1f} MB in {self.seconds:.1f} s "
                f"({mb / max(self.seconds, 1e-9):,.1f} MB/s, "
                f"{self.tokens / max(self.seconds, 1e-9) / 1e6:,.2f}M tokens/s) -> "
                f"{self.output_prefix}.bin/.idx")

    def to_dict(self) -> dict:
        return asdict(self)


class Progress:
    """One stderr line, redrawn at most twice a second: MB read, MB/s, tokens/s."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.start, self.last = enabled, time.perf_counter(), 0.0

    def update(self, nbytes: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.5 and not final):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        sys.stderr.write(f"\r{nbytes / 1e6:10,.1f} MB  {nbytes / 1e6 / elapsed:8,.1f} MB/s  "
                         f"{tokens / elapsed / 1e6:7,.2f}M tokens/s" + ("\n" if final else ""))
        sys.stderr.flush()


def _results(work: Iterator[list[str]], workers: int, spec: str, eod: int | None
             ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Encoded batches in input order, from `workers` processes (in-process for 1)."""
    if workers <= 1:
        _init_worker(spec, eod)
        yield from map(_encode_work, work)
        return
    # spawn, not fork: a fork of a process that already runs torch's (or gloo's) threads can
    # deadlock in the child on a lock one of those threads held
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (spec, eod)) as pool:
        pending: deque = deque()
        for texts in work:
            pending.append(pool.apply_async(_encode_work, (texts,)))
            if len(pending) >= 2 * workers:  # bounded: memory does not grow with the input
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(inputs: list[str], output_prefix: str | Path, tokenizer: str = "byte",
               workers: int = 1, json_key: str = "text", append_eod: bool = False,
               progress: bool = False) -> PreprocessSummary:
    """Tokenize `inputs` (paths or globs) into OUTPUT_PREFIX.bin / .idx; returns a summary."""
    files = expand_inputs(inputs)
    tok = build_tokenizer(tokenizer)
    if append_eod and tok.eot_id is None:
        raise ValueError(f"--append-eod: tokenizer {tok.name!r} has no end-of-text token")
    dtype = smallest_dtype(tok.vocab_size)
    writer = IndexedWriter(output_prefix, dtype)
    meter, nbytes, documents = Progress(progress), 0, 0
    start = time.perf_counter()
    eod = tok.eot_id if append_eod else None
    for ids, lengths, read in _results(batches(files, json_key), workers, tokenizer, eod):
        writer.add_batch(ids, lengths)
        nbytes, documents = nbytes + read, documents + len(lengths)
        meter.update(nbytes, writer.num_tokens)
    writer.finish()
    meter.update(nbytes, writer.num_tokens, final=True)
    return PreprocessSummary(len(files), documents, writer.num_tokens, nbytes,
                             time.perf_counter() - start, str(dtype), str(output_prefix))
