"""Remove downstream-task contamination: cut n-gram overlaps with evaluation sets out of a corpus.

    python tools/decontaminate.py --input IN.jsonl --eval EVAL1.jsonl [EVAL2.jsonl ...]
        --output OUT.jsonl [--ngram 13] [--margin 200] [--min-piece 200] [--max-pieces 10]
        [--workers N] [--text-key text] [--eval-key text]

A document sharing an n-gram (lower case, punctuation stripped) with any evaluation example loses
the match plus `--margin` characters on each side and is split there; pieces shorter than
`--min-piece` characters are dropped, and a document split into more than `--max-pieces` pieces
is dropped whole. Untouched documents are written unchanged; pieces keep the document's fields
(id becomes "<id>#<k>"). OUT.removed.jsonl lists every contaminated document, OUT.summary.json
the report per evaluation set. Method: nanomt/curation/decontaminate.py, docs/curation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanomt.curation.decontaminate import DecontamOptions, decontaminate  # noqa: E402
from nanomt.curation.stream import add_stream_arguments, run_tool  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_stream_arguments(parser, batch_size=DecontamOptions.batch_size)
    parser.add_argument("--eval", nargs="+", required=True, metavar="EVAL.jsonl",
                        help="evaluation sets, one example per line")
    parser.add_argument("--eval-key", default="text",
                        help="field of an example's text (absent: all its string fields)")
    parser.add_argument("--id-key", default="id", help="field holding the id (else: line number)")
    parser.add_argument("--ngram", type=int, default=13, help="words per n-gram")
    parser.add_argument("--margin", type=int, default=200, help="characters cut on each side")
    parser.add_argument("--min-piece", type=int, default=200, help="shorter pieces are dropped")
    parser.add_argument("--max-pieces", type=int, default=10,
                        help="a document split into more pieces is dropped whole")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = DecontamOptions(ngram=args.ngram, margin=args.margin, min_piece=args.min_piece,
                              max_pieces=args.max_pieces, text_key=args.text_key,
                              id_key=args.id_key, eval_key=args.eval_key,
                              batch_size=args.batch_size)
    return run_tool(lambda: decontaminate(args.input, args.eval, args.output, options,
                                          args.workers, progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
