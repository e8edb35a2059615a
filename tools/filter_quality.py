"""Filter a JSONL corpus with Gopher / C4-style quality heuristics, each threshold configurable.

    python tools/filter_quality.py --input IN.jsonl --output OUT.jsonl [--min-words 50]
        [--max-repeated-lines 0.3] [--max-top-ngram 0.20,0.18,0.16] [--disable RULE ...]
        [--workers N] [--text-key text]

Rules (in order; the first that fails removes the document): word_count, mean_word_length,
symbol_ratio, alpha_words, line_punctuation, repeated_lines, repeated_line_chars, top_ngram,
duplicate_ngrams; `--help` lists every threshold and its default. Writes OUT.jsonl (lines
unchanged), OUT.removed.jsonl (each removed document with `reason` and `detail`) and
OUT.summary.json (removed per rule). Method: nanomt/curation/quality.py, docs/curation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanomt.curation.quality import RULES, QualityThresholds, filter_quality  # noqa: E402
from nanomt.curation.stream import add_stream_arguments, run_tool  # noqa: E402


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_stream_arguments(parser, batch_size=128)
    for f in dataclasses.fields(QualityThresholds):  # one flag per threshold
        kind = floats if isinstance(f.default, tuple) else type(f.default)
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        metavar = ",".join("X" * len(f.default)) if isinstance(f.default, tuple) else "X"
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                            metavar=metavar, help=f"{f.metadata['help']} (default {shown})")
    parser.add_argument("--disable", nargs="+", default=[], choices=list(RULES), metavar="RULE",
                        help=f"rules to skip: {', '.join(RULES)}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    thresholds = QualityThresholds(**{f.name: getattr(args, f.name)
                                      for f in dataclasses.fields(QualityThresholds)})
    return run_tool(lambda: filter_quality(args.input, args.output, thresholds,
                                           tuple(args.disable), args.text_key, args.workers,
                                           args.batch_size, progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
