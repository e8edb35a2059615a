"""Downstream-task decontamination: cut n-gram overlaps with evaluation sets out of training text.

The GPT-3 rule (Brown et al. 2020, app. C), which MT-NLG applied to its corpus: normalise both
sides (lower case, punctuation stripped, split on whitespace) and collect every n consecutive
words (n = 13) of every evaluation example. A training document that contains one of those
n-grams loses the matching span plus `margin` characters on each side and is split there:

    ....kept text....[margin | matching 13-gram | margin]....kept text....  ->  2 pieces

Pieces shorter than `min_piece` characters are dropped, and a document split into more than
`max_pieces` pieces (10) is dropped whole: it is more evaluation data than training data.
Documents without a match are written back byte for byte.

Lookup. Each word is hashed to 32 bits (CRC-32) and every n-gram to 64 bits by a polynomial
rolling hash, for all positions of a document at once with numpy:

    H(w_i .. w_{i+n-1}) = sum_j crc(w_{i+j}) * B^(n-1-j)   mod 2^64

The evaluation n-grams are one sorted array, searched with np.searchsorted, with a bitmask per
n-gram of the evaluation sets it came from. A false match needs a 64-bit collision: about
N_doc * N_eval / 2^64 expected, 1e-3 for 1e10 document n-grams against 1e6 evaluation n-grams.
Most documents have no match, so they are checked on the normalised word list alone; only a
matching document is tokenised again with character offsets to find what to cut.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from nanomt.curation.stream import (JsonlWriter, Line, Summary, batch_bytes, check_paths,
                                    check_workers, document_id, map_ordered, parse_document,
                                    parse_record, progress_bar, read_batches, sibling)
from nanomt.errors import ConfigError

NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]+")  # punctuation and symbols
TOKEN = re.compile(r"\S+")
BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the rolling hash
MAX_EVAL_SETS = 64                     # one bit each in the owner mask


@dataclass
class DecontamOptions:
    ngram: int = 13          # words per n-gram
    margin: int = 200        # characters removed on each side of a match
    min_piece: int = 200     # pieces shorter than this (characters) are dropped
    max_pieces: int = 10     # a document split into more pieces is dropped whole
    text_key: str = "text"
    id_key: str = "id"
    eval_key: str = "text"   # evaluation text; without it, every string field of the example
    batch_size: int = 64

    def check(self) -> None:
        if self.ngram < 1 or self.batch_size < 1:
            raise ConfigError("--ngram and --batch-size must be at least 1")
        if self.margin < 0 or self.min_piece < 0 or self.max_pieces < 1:
            raise ConfigError("--margin and --min-piece must be >= 0, --max-pieces >= 1")


# ---- normalisation and n-gram hashes ------------------------------------------------------------
def normalise_word(token: str) -> str:
    return NOT_WORD_OR_SPACE.sub("", token.lower())


def normalised_words(text: str) -> list[str]:
    """Lower case, punctuation stripped, split on whitespace (tokens of punctuation vanish)."""
    return NOT_WORD_OR_SPACE.sub("", text.lower()).split()


def words_with_spans(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The same words as `normalised_words`, each with its (start, end) in the original text."""
    words, spans = [], []
    for match in TOKEN.finditer(text):
        word = normalise_word(match.group())
        if word:
            words.append(word)
            spans.append(match.span())
    return words, spans


def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """64-bit hash of every n consecutive words (empty when there are fewer than n words)."""
    count = len(words) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    hashes = h[:count].copy()
    for j in range(1, n):
        hashes = hashes * BASE + h[j:j + count]  # wraps mod 2^64
    return hashes


# ---- the evaluation table -----------------------------------------------------------------------
@dataclass
class EvalTable:
    """Every evaluation n-gram hash (sorted, unique) and a bitmask of the sets that contain it."""

    names: list[str]
    hashes: np.ndarray
    owners: np.ndarray
    stats: dict[str, dict[str, int]] = field(default_factory=dict)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """The owner mask of each hash (0: in no evaluation set)."""
        if len(self.hashes) == 0 or len(hashes) == 0:
            return np.zeros(len(hashes), dtype=np.uint64)
        at = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return np.where(self.hashes[at] == hashes, self.owners[at], np.uint64(0))

    def set_names(self, mask: int) -> list[str]:
        return [name for k, name in enumerate(self.names) if mask >> k & 1]


def example_texts(record: dict[str, Any], key: str) -> list[str]:
    """An evaluation example's text: record[key], or else every string field (and list of them)."""
    if isinstance(record.get(key), str):
        return [record[key]]
    texts = []
    for value in record.values():
        values = value if isinstance(value, list) else [value]
        texts += [v for v in values if isinstance(v, str)]
    return texts


def read_eval_set(path: Path, options: DecontamOptions) -> tuple[np.ndarray, dict[str, int]]:
    """The unique n-gram hashes of one evaluation file, and what it held."""
    parts, examples, too_short = [], 0, 0
    for batch in read_batches(path, 1024):
        for line, raw in batch:
            examples += 1
            grams = [ngram_hashes(normalised_words(t), options.ngram)
                     for t in example_texts(parse_record(raw, f"{path}:{line}"), options.eval_key)]
            too_short += all(len(g) == 0 for g in grams)
            parts += grams
    if examples == 0:
        raise ConfigError(f"evaluation file {path} has no examples", "check the --eval paths")
    hashes = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)
    return hashes, {"examples": examples, "ngrams": len(hashes), "shorter_than_ngram": too_short}


def load_eval_sets(paths: list[Path], options: DecontamOptions) -> EvalTable:
    if not paths or len(paths) > MAX_EVAL_SETS:
        raise ConfigError(f"pass 1 to {MAX_EVAL_SETS} evaluation files with --eval")
    names = [p.stem if [q.stem for q in paths].count(p.stem) == 1 else str(p) for p in paths]
    per_set, stats = [], {}
    for k, (path, name) in enumerate(zip(paths, names)):
        hashes, stats[name] = read_eval_set(path, options)
        per_set.append((hashes, np.full(len(hashes), 1 << k, dtype=np.uint64)))
    all_hashes = np.concatenate([h for h, _ in per_set])
    all_owners = np.concatenate([o for _, o in per_set])
    hashes, inverse = np.unique(all_hashes, return_inverse=True)
    owners = np.zeros(len(hashes), dtype=np.uint64)
    np.bitwise_or.at(owners, inverse, all_owners)
    return EvalTable(names, hashes, owners, stats)


# ---- one document -------------------------------------------------------------------------------
def find_matches(text: str, table: EvalTable, n: int) -> list[tuple[int, int, int]]:
    """(start, end, owner mask) in characters of every n-gram of `text` found in the table."""
    if not table.lookup(ngram_hashes(normalised_words(text), n)).any():
        return []  # the common case: one pass over the words, no offsets
    words, spans = words_with_spans(text)
    owners = table.lookup(ngram_hashes(words, n))
    return [(spans[i][0], spans[i + n - 1][1], int(owners[i])) for i in np.flatnonzero(owners)]


def cut(text: str, matches: list[tuple[int, int, int]], margin: int) -> list[str]:
    """The text between the matches, each widened by `margin` characters; empty pieces vanish."""
    cuts = sorted((max(0, start - margin), min(len(text), end + margin))
                  for start, end, _ in matches)
    pieces, position = [], 0
    for start, end in cuts:
        if start > position:
            pieces.append(text[position:start])
        position = max(position, end)
    pieces.append(text[position:])
    return [piece.strip() for piece in pieces if piece.strip()]


class Outcome(NamedTuple):
    """What happened to one contaminated document (an uncontaminated one gives None)."""

    id: Any
    owners: int              # bitmask of the evaluation sets it matched
    matches: int
    pieces: int              # pieces the cut made
    kept: list[dict]         # the piece documents written to the output
    removed_chars: int
    first_match: str


_WORKER: dict[str, Any] = {}


def _init_worker(options: DecontamOptions, table: EvalTable, source: str) -> None:
    _WORKER.update(options=options, table=table, source=source)


def decontaminate_document(record: dict, text: str, line: int) -> Outcome | None:
    options: DecontamOptions = _WORKER["options"]
    matches = find_matches(text, _WORKER["table"], options.ngram)
    if not matches:
        return None
    pieces = cut(text, matches, options.margin)
    long_enough = [p for p in pieces if len(p) >= options.min_piece]
    if len(pieces) > options.max_pieces:
        long_enough = []
    doc_id = document_id(record, options.id_key, line)
    kept = []
    for k, piece in enumerate(long_enough):
        kept.append({**record, options.text_key: piece})
        if options.id_key in record:
            kept[-1][options.id_key] = f"{doc_id}#{k}"
    owners = 0
    for _, _, mask in matches:
        owners |= mask
    start, end, _ = matches[0]
    return Outcome(doc_id, owners, len(matches), len(pieces), kept,
                   len(text) - sum(map(len, long_enough)), text[start:end])


def decontaminate_batch(batch: list[Line]) -> list[Outcome | None]:
    key, source = _WORKER["options"].text_key, _WORKER["source"]
    out = []
    for line, raw in batch:
        record, text = parse_document(raw, f"{source}:{line}", key)
        out.append(decontaminate_document(record, text, line))
    return out


# ---- the corpus ---------------------------------------------------------------------------------
def record_outcome(outcome: Outcome, table: EvalTable, options: DecontamOptions,
                   summary: Summary, out: JsonlWriter, removed: JsonlWriter) -> None:
    names = table.set_names(outcome.owners)
    for name in names:
        table.stats[name]["documents_matched"] += 1
    for piece in outcome.kept:
        out.write(piece)
    if not outcome.kept:
        summary.remove("too_many_pieces" if outcome.pieces > options.max_pieces
                       else "no_piece_long_enough")
    summary.details["pieces_written"] += len(outcome.kept)
    if outcome.pieces <= options.max_pieces:
        summary.details["pieces_too_short"] += outcome.pieces - len(outcome.kept)
    summary.details["characters_removed"] += outcome.removed_chars
    removed.write({"id": outcome.id, "eval_sets": names, "matches": outcome.matches,
                   "pieces": outcome.pieces, "pieces_kept": len(outcome.kept),
                   "first_match": outcome.first_match})


def decontaminate(input_path: str | Path, eval_paths: list[str | Path], output_path: str | Path,
                  options: DecontamOptions | None = None, workers: int = 1,
                  progress: bool = True) -> Summary:
    """IN.jsonl minus its overlaps with the evaluation sets -> OUT.jsonl (+ .removed.jsonl
    listing each contaminated document, .summary.json with the report per evaluation set)."""
    options = options or DecontamOptions()
    options.check()
    check_workers(workers)
    path, output, evals = Path(input_path), Path(output_path), [Path(p) for p in eval_paths]
    check_paths([path, *evals], output)
    summary = Summary("decontaminate")
    table = load_eval_sets(evals, options)
    for stats in table.stats.values():
        stats["documents_matched"] = 0
    summary.details.update(ngram=options.ngram, documents_contaminated=0, pieces_written=0,
                           pieces_too_short=0, characters_removed=0, eval_sets=table.stats,
                           workers=workers)
    batches = read_batches(path, options.batch_size)
    with JsonlWriter(output) as out, JsonlWriter(sibling(output, ".removed.jsonl")) as removed, \
            progress_bar(path, "decontaminate", progress) as bar:
        for batch, outcomes in map_ordered(decontaminate_batch, batches, workers, _init_worker,
                                           (options, table, str(path))):
            for (_, raw), outcome in zip(batch, outcomes):
                if outcome is None:
                    out.write_raw(raw)
                else:
                    summary.details["documents_contaminated"] += 1
                    record_outcome(outcome, table, options, summary, out, removed)
            summary.docs_in += len(batch)
            summary.bytes_in += batch_bytes(batch)
            bar.update(batch_bytes(batch))
    summary.docs_out = out.count
    summary.finish()
    summary.write(sibling(output, ".summary.json"))
    return summary
