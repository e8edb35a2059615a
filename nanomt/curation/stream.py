"""Streaming JSONL through worker processes: what dedup, decontaminate and filter_quality share.

A corpus is larger than memory, so no step holds its text. The main process reads the input in
batches of raw lines, worker processes parse and process each batch, and the main process gets
the results back in input order (so "keep the first" means the first in the file) and writes the
output as it goes. What stays in memory is per-document bookkeeping (dedup's signatures, ids)
and a few batches in flight:

    read batch k+w ──► [worker 1 .. w] ──► result k ──► write / index ──► next

`Pool.imap` and `ProcessPoolExecutor.map` would read their whole input ahead of the workers (they
submit every task at once), so `map_ordered` keeps a bounded window of 2 batches per worker
instead. Workers are started with "spawn", which works the same on every platform and inside
threaded parents, by a ProcessPoolExecutor, which reports a worker that dies (killed, out of
memory) instead of waiting for it forever as a Pool does.

Bad input stops the tool with one line naming the file and line, e.g.
    nanomt: error: in.jsonl:17: not valid JSON (Expecting ',' delimiter); fix or remove that line
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from nanomt.errors import ConfigError, ExitCode, NanomtError, exit_with

class WorkerDied(ConfigError):
    """A worker process ended without a result (exit code 1: not bad input, but nameable)."""

    exit_code = ExitCode.UNEXPECTED


T = TypeVar("T")
R = TypeVar("R")
Line = tuple[int, bytes]  # (1-based line number, the raw line without its newline)


# ---- reading ------------------------------------------------------------------------------------
def read_batches(path: str | Path, batch_size: int) -> Iterator[list[Line]]:
    """The non-blank lines of a JSONL file, `batch_size` at a time, with their line numbers."""
    batch: list[Line] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            batch.append((number, raw))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def batch_bytes(batch: list[Line]) -> int:
    return sum(len(raw) + 1 for _, raw in batch)


def parse_record(raw: bytes, where: str) -> dict[str, Any]:
    """One JSONL line -> its JSON object. `where` is "file:line" for error messages."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise ConfigError(f"{where}: not valid JSON ({reason})",
                          "fix or remove that line") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}",
                          "each line must be one {...} document")
    return record


def parse_document(raw: bytes, where: str, text_key: str) -> tuple[dict[str, Any], str]:
    """One JSONL line -> (the record, its text)."""
    record = parse_record(raw, where)
    if text_key not in record:
        raise ConfigError(f"{where}: no {text_key!r} key in the document",
                          "name the text field with --text-key")
    text = record[text_key]
    if not isinstance(text, str):
        raise ConfigError(f"{where}: {text_key!r} is a {type(text).__name__}, not a string",
                          "name the text field with --text-key")
    return record, text


def document_id(record: dict[str, Any], id_key: str, line: int) -> Any:
    """A document's id: its `id_key` field, or its line number when it has none."""
    return record.get(id_key, line)


def check_paths(inputs: Iterable[str | Path], output: str | Path) -> None:
    """Every input is a readable file and differs from the output; the output folder exists."""
    output = Path(output)
    for path in inputs:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"input file not found: {path}", "check the path")
        if output.exists() and path.resolve() == output.resolve():
            raise ConfigError(f"the output {output} is also an input", "write to another file")
    output.parent.mkdir(parents=True, exist_ok=True)


def sibling(output: str | Path, suffix: str) -> Path:
    """OUT.jsonl -> OUT<suffix> (e.g. OUT.removed.jsonl): the files written beside the output."""
    output = Path(output)
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + suffix)


# ---- writing ------------------------------------------------------------------------------------
class JsonlWriter:
    """Writes OUT.tmp and renames it to OUT on success, so a failed run leaves no half output."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.count = 0
        self.file = open(self.tmp, "wb")

    def write_raw(self, raw: bytes) -> None:
        """An input line as it was, byte for byte (documents a step leaves untouched)."""
        self.file.write(raw)
        self.file.write(b"\n")
        self.count += 1

    def write(self, record: dict[str, Any]) -> None:
        self.write_raw(json.dumps(record, ensure_ascii=False).encode())

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# ---- workers ------------------------------------------------------------------------------------
def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int,
                initializer: Callable[..., None] | None = None,
                initargs: tuple = ()) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) for each item, in input order, in `workers` processes (1: this one).

    `initializer(*initargs)` runs once per worker: it hands each worker the step's settings (and
    the decontamination table) once rather than with every batch. At most 2 * workers items are
    in flight (the main process keeps them to write untouched lines back), so memory does not
    grow with the input.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield item, fn(item)
        return
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer,
                               initargs)
    try:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= 2 * workers:
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()
    except BrokenProcessPool:
        raise WorkerDied("a worker process died (killed, or out of memory?)",
                         "run again, with fewer --workers or a smaller --batch-size") from None
    finally:  # the workers end here, so their CPU time counts in the summary
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_stream_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """The command-line options every curation tool shares."""
    parser.add_argument("--input", required=True, help="JSONL, one {\"text\": ...} per line")
    parser.add_argument("--output", required=True, help="JSONL; .removed.jsonl and "
                        ".summary.json are written beside it")
    parser.add_argument("--text-key", default="text", help="field holding the text")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes (default: the CPUs available)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help="documents per worker task")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_tool(step: Callable[[], Summary]) -> int:
    """Run a tool's step: its summary on stdout, or one error line and exit code 2 for bad input."""
    try:
        summary = step()
    except NanomtError as error:
        exit_with(error)
    print("\n".join(summary.lines()), flush=True)
    return 0


def check_workers(workers: int) -> int:
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}", "pass --workers N")
    return workers


def progress_bar(path: str | Path, desc: str, enabled: bool = True) -> tqdm:
    """A bar over the input's bytes (known before reading, unlike its number of documents)."""
    return tqdm(total=os.path.getsize(path), desc=desc, unit="B", unit_scale=True,
                disable=None if enabled else True, mininterval=0.5, file=sys.stderr)


# ---- the end summary ----------------------------------------------------------------------------
def _peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Summary:
    """Documents in / out, removed per reason, throughput; printed at the end and saved as JSON."""

    tool: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process and its finished workers, user + system
    start: float = field(default_factory=time.perf_counter, repr=False)
    start_cpu: float = field(default_factory=lambda: _cpu_seconds(), repr=False)

    def remove(self, reason: str, count: int = 1) -> None:
        self.removed[reason] = self.removed.get(reason, 0) + count

    def finish(self) -> Summary:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = _cpu_seconds() - self.start_cpu
        return self

    def to_dict(self) -> dict[str, Any]:
        seconds = max(self.seconds, 1e-9)
        return {"tool": self.tool, "docs_in": self.docs_in, "docs_out": self.docs_out,
                "removed": dict(self.removed), "removed_total": sum(self.removed.values()),
                "bytes_in": self.bytes_in, "seconds": round(self.seconds, 3),
                "docs_per_s": round(self.docs_in / seconds, 1),
                "mb_per_s": round(self.bytes_in / 1e6 / seconds, 2),
                "cpu_s": round(self.cpu_seconds, 3),
                "docs_per_cpu_s": round(self.docs_in / max(self.cpu_seconds, 1e-9), 1),
                "peak_rss_mb": round(_peak_rss_mb(resource.RUSAGE_SELF), 1),
                "workers_peak_rss_mb": round(_peak_rss_mb(resource.RUSAGE_CHILDREN), 1),
                **self.details}

    def lines(self) -> list[str]:
        d = self.to_dict()
        out = [f"{self.tool}: {d['docs_in']} documents in, {d['docs_out']} out, "
               f"{d['removed_total']} removed in {d['seconds']:.1f} s "
               f"({d['docs_per_s']:.0f} docs/s, {d['mb_per_s']:.1f} MB/s; "
               f"{d['cpu_s']:.1f} CPU s)"]
        out += [f"  removed, {reason}: {count}" for reason, count in self.removed.items()]
        for key, value in self.details.items():
            if isinstance(value, dict):  # e.g. one line per evaluation set
                out.append(f"  {key}:")
                out += [f"    {name}: {fields}" for name, fields in value.items()]
            else:
                out.append(f"  {key}: {value}")
        return out

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
