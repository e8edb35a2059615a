"""Heuristic quality filters after Gopher (Rae et al. 2021, app. A.1.1) and C4 (Raffel et al. 2020).

MT-NLG filtered Common Crawl with a quality classifier; these rules are the transparent kind that
Gopher, C4 and most open pipelines apply first. Each rule measures one number per document and
removes the document when the number crosses its threshold (all configurable):

    rule                 measures                                            removes when
    word_count           words (split on whitespace)                         < 50 or > 100,000
    mean_word_length     characters per word                                 < 3 or > 10
    symbol_ratio         "#" or ellipses per word (the larger)               > 0.1
    alpha_words          fraction of words with a letter                     < 0.8
    line_punctuation     fraction of lines ending in terminal punctuation    < 0.12
    repeated_lines       fraction of lines that repeat an earlier line       > 0.3
    repeated_line_chars  fraction of line characters in those lines          > 0.2
    top_ngram            characters of the most frequent n-gram (all its     > 0.20, 0.18, 0.16
                         occurrences) / characters of all words, n = 2,3,4
    duplicate_ngrams     characters of words inside an n-gram seen earlier   > 0.15, 0.14, 0.13,
                         in the document / characters of all words, n=5..10  0.12, 0.11, 0.10

Rules run in this order, cheapest first, and the first that fails is the reason a document is
removed (so a page of one repeated line counts under repeated_lines, not under the n-gram rules
that it fails too). The n-gram rules compare lower-cased words.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from nanomt.curation.stream import (JsonlWriter, Line, Summary, batch_bytes, check_paths,
                                    check_workers, map_ordered, parse_document, progress_bar,
                                    read_batches, sibling)
from nanomt.errors import ConfigError

TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "\u2026", "\u201d", "\u2019")
LETTER = re.compile(r"[^\W\d_]")
TOP_NGRAM_SIZES = (2, 3, 4)
DUPLICATE_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)


@dataclass
class QualityThresholds:
    min_words: int = field(default=50, metadata={"help": "fewer words: removed"})
    max_words: int = field(default=100_000, metadata={"help": "more words: removed"})
    min_mean_word_length: float = field(default=3.0, metadata={"help": "characters"})
    max_mean_word_length: float = field(default=10.0, metadata={"help": "characters"})
    max_symbol_ratio: float = field(default=0.1, metadata={"help": "'#' or ellipses per word"})
    min_alpha_words: float = field(default=0.8,
                                   metadata={"help": "fraction of words with a letter"})
    min_line_punctuation: float = field(
        default=0.12, metadata={"help": "fraction of lines ending in . ! ? or a quote"})
    max_repeated_lines: float = field(
        default=0.3, metadata={"help": "fraction of lines repeating an earlier line"})
    max_repeated_line_chars: float = field(
        default=0.2, metadata={"help": "fraction of line characters in repeated lines"})
    max_top_ngram: tuple[float, ...] = field(
        default=(0.20, 0.18, 0.16), metadata={"help": "for n = 2,3,4: character fraction of the "
                                                      "most frequent n-gram"})
    max_duplicate_ngrams: tuple[float, ...] = field(
        default=(0.15, 0.14, 0.13, 0.12, 0.11, 0.10),
        metadata={"help": "for n = 5..10: character fraction inside repeated n-grams"})

    def check(self) -> None:
        if len(self.max_top_ngram) != len(TOP_NGRAM_SIZES):
            raise ConfigError("--max-top-ngram needs 3 values (for n = 2, 3, 4)")
        if len(self.max_duplicate_ngrams) != len(DUPLICATE_NGRAM_SIZES):
            raise ConfigError("--max-duplicate-ngrams needs 6 values (for n = 5 to 10)")
        if self.min_words > self.max_words or self.min_mean_word_length > self.max_mean_word_length:
            raise ConfigError("a --min-* threshold is above its --max-* threshold")


class Doc:
    """A document's text and the views of it the rules share, each computed once on demand."""

    def __init__(self, text: str):
        self.text = text
        self.words = text.split()

    @cached_property
    def lines(self) -> list[str]:
        return [line.strip() for line in self.text.splitlines() if line.strip()]

    @cached_property
    def lower_words(self) -> list[str]:
        return [w.lower() for w in self.words]

    @cached_property
    def word_chars(self) -> int:
        return max(1, sum(map(len, self.words)))

    @cached_property
    def line_repetition(self) -> tuple[float, float]:
        """(fraction of lines, fraction of line characters) repeating an earlier line."""
        seen, repeated, repeated_chars = set(), 0, 0
        for line in self.lines:
            if line in seen:
                repeated, repeated_chars = repeated + 1, repeated_chars + len(line)
            seen.add(line)
        total_chars = max(1, sum(map(len, self.lines)))
        return repeated / max(1, len(self.lines)), repeated_chars / total_chars


# ---- the rules: each returns None (passes) or what it measured (removes) ------------------------
Rule = Callable[[Doc, QualityThresholds], "str | None"]


def word_count(doc: Doc, t: QualityThresholds) -> str | None:
    n = len(doc.words)
    return None if t.min_words <= n <= t.max_words else f"{n} words"


def mean_word_length(doc: Doc, t: QualityThresholds) -> str | None:
    mean = sum(map(len, doc.words)) / max(1, len(doc.words))
    ok = t.min_mean_word_length <= mean <= t.max_mean_word_length
    return None if ok else f"{mean:.2f} characters per word"


def symbol_ratio(doc: Doc, t: QualityThresholds) -> str | None:
    hashes = doc.text.count("#")
    ellipses = doc.text.count("...") + doc.text.count("\u2026")
    ratio = max(hashes, ellipses) / max(1, len(doc.words))
    return None if ratio <= t.max_symbol_ratio else f"{ratio:.3f} symbols per word"


def alpha_words(doc: Doc, t: QualityThresholds) -> str | None:
    fraction = sum(1 for w in doc.words if LETTER.search(w)) / max(1, len(doc.words))
    return None if fraction >= t.min_alpha_words else f"{fraction:.3f} of words with a letter"


def line_punctuation(doc: Doc, t: QualityThresholds) -> str | None:
    ending = sum(line.endswith(TERMINAL_PUNCTUATION) for line in doc.lines)
    fraction = ending / max(1, len(doc.lines))
    return None if fraction >= t.min_line_punctuation else f"{fraction:.3f} of lines"


def repeated_lines(doc: Doc, t: QualityThresholds) -> str | None:
    fraction = doc.line_repetition[0]
    return None if fraction <= t.max_repeated_lines else f"{fraction:.3f} of lines"


def repeated_line_chars(doc: Doc, t: QualityThresholds) -> str | None:
    fraction = doc.line_repetition[1]
    return None if fraction <= t.max_repeated_line_chars else f"{fraction:.3f} of characters"


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[k:] for k in range(n))))


def top_ngram(doc: Doc, t: QualityThresholds) -> str | None:
    for n, limit in zip(TOP_NGRAM_SIZES, t.max_top_ngram):
        counts = Counter(ngrams(doc.lower_words, n))
        if not counts:
            return None
        gram, count = counts.most_common(1)[0]
        fraction = count * sum(map(len, gram)) / doc.word_chars if count > 1 else 0.0
        if fraction > limit:
            return f"{n}-gram {' '.join(gram)!r}: {fraction:.3f} of characters"
    return None


def duplicate_ngrams(doc: Doc, t: QualityThresholds) -> str | None:
    words = doc.lower_words
    for n, limit in zip(DUPLICATE_NGRAM_SIZES, t.max_duplicate_ngrams):
        covered, seen = bytearray(len(words)), set()
        for i, gram in enumerate(ngrams(words, n)):
            if gram in seen:
                covered[i:i + n] = b"\x01" * n
            seen.add(gram)
        fraction = sum(len(w) for w, c in zip(words, covered) if c) / doc.word_chars
        if fraction > limit:
            return f"repeated {n}-grams: {fraction:.3f} of characters"
    return None


RULES: dict[str, Rule] = {rule.__name__: rule for rule in (
    word_count, mean_word_length, symbol_ratio, alpha_words, line_punctuation, repeated_lines,
    repeated_line_chars, top_ngram, duplicate_ngrams)}


def check_document(text: str, thresholds: QualityThresholds,
                   disabled: frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """None if `text` passes every enabled rule, else (the first failing rule, what it measured)."""
    doc = Doc(text)
    for name, rule in RULES.items():
        if name not in disabled:
            measured = rule(doc, thresholds)
            if measured is not None:
                return name, measured
    return None


# ---- the corpus ---------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(thresholds: QualityThresholds, disabled: frozenset[str], text_key: str,
                 source: str) -> None:
    _WORKER.update(thresholds=thresholds, disabled=disabled, text_key=text_key, source=source)


def check_batch(batch: list[Line]) -> list[tuple[str, str] | None]:
    w = _WORKER
    return [check_document(parse_document(raw, f"{w['source']}:{line}", w["text_key"])[1],
                           w["thresholds"], w["disabled"]) for line, raw in batch]


def filter_quality(input_path: str | Path, output_path: str | Path,
                   thresholds: QualityThresholds | None = None, disabled: tuple[str, ...] = (),
                   text_key: str = "text", workers: int = 1, batch_size: int = 128,
                   progress: bool = True) -> Summary:
    """IN.jsonl -> OUT.jsonl (documents passing every rule) and OUT.removed.jsonl (the others,
    each with `reason`, its first failing rule, and `detail`, what that rule measured)."""
    thresholds = thresholds or QualityThresholds()
    thresholds.check()
    unknown = set(disabled) - set(RULES)
    if unknown:
        raise ConfigError(f"unknown rule(s) {sorted(unknown)}", f"rules are {', '.join(RULES)}")
    check_workers(workers)
    path, output = Path(input_path), Path(output_path)
    check_paths([path], output)
    summary = Summary("filter_quality")
    summary.removed = {name: 0 for name in RULES if name not in disabled}
    initargs = (thresholds, frozenset(disabled), text_key, str(path))
    with JsonlWriter(output) as out, JsonlWriter(sibling(output, ".removed.jsonl")) as removed, \
            progress_bar(path, "filter_quality", progress) as bar:
        for batch, verdicts in map_ordered(check_batch, read_batches(path, batch_size), workers,
                                           _init_worker, initargs):
            for (_, raw), verdict in zip(batch, verdicts):
                if verdict is None:
                    out.write_raw(raw)
                else:
                    removed.write({**parse_document(raw, "", text_key)[0],
                                   "reason": verdict[0], "detail": verdict[1]})
                    summary.remove(verdict[0])
            summary.docs_in += len(batch)
            summary.bytes_in += batch_bytes(batch)
            bar.update(batch_bytes(batch))
    summary.docs_out = out.count
    summary.details.update(thresholds=asdict(thresholds), disabled=sorted(disabled),
                           workers=workers)
    summary.finish()
    summary.write(sibling(output, ".summary.json"))
    return summary
