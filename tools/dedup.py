"""Deduplicate a JSONL corpus: exact (normalised-text hash) and fuzzy (MinHash + LSH) duplicates.

    python tools/dedup.py --input IN.jsonl --output OUT.jsonl [--threshold 0.8] [--exact]
        [--ngram 5] [--num-perm 128] [--bands B --rows R] [--keep first|longest] [--workers N]
        [--text-key text] [--id-key id]

Writes OUT.jsonl (the kept documents, lines unchanged), OUT.removed.jsonl (each removed document
with `duplicate_of`: the id of the document kept in its place, `similarity`: their estimated
Jaccard similarity, `reason`: exact or fuzzy) and OUT.summary.json. The method is explained in
nanomt/curation/dedup.py and docs/curation.md. Fuzzy deduplication needs datasketch
(`pip install -e '.[curate]'`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanomt.curation.dedup import DedupOptions, deduplicate  # noqa: E402
from nanomt.curation.stream import add_stream_arguments, run_tool  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_stream_arguments(parser, batch_size=DedupOptions.batch_size)
    parser.add_argument("--id-key", default="id", help="field holding the id (else: line number)")
    parser.add_argument("--exact", action="store_true",
                        help="exact duplicates only (lower case, whitespace collapsed), no MinHash")
    parser.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity")
    parser.add_argument("--ngram", type=int, default=5, help="words per shingle")
    parser.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    parser.add_argument("--bands", type=int, help="LSH bands (default: from threshold, num-perm)")
    parser.add_argument("--rows", type=int, help="LSH rows per band")
    parser.add_argument("--keep", choices=("first", "longest"), default="first",
                        help="which document of a cluster of duplicates to keep")
    parser.add_argument("--seed", type=int, default=1, help="of the MinHash permutations")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = DedupOptions(threshold=args.threshold, ngram=args.ngram, num_perm=args.num_perm,
                           bands=args.bands, rows=args.rows, exact_only=args.exact,
                           keep=args.keep, text_key=args.text_key, id_key=args.id_key,
                           seed=args.seed, batch_size=args.batch_size)
    return run_tool(lambda: deduplicate(args.input, args.output, options, args.workers,
                                        progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
