"""Tokenize text or JSON-lines files into a Megatron-compatible indexed dataset (.bin + .idx).

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/web \\
        --tokenizer gpt2 --workers 8 --append-eod
    # then: python -m nanomt.train data.path=data/web data.tokenizer=gpt2 ...

JSON lines give one document per line (`--json-key`, default "text"); other text files are split
into paragraphs at blank lines (nanomt.data.preprocess). Memory stays constant whatever the input
size; the output is the same for any --workers. Megatron-LM reads the result as it is.
"""

from __future__ import annotations

import argparse
import json
import sys

from nanomt.data.preprocess import preprocess


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, nargs="+",
                        help="input files or glob patterns (.txt, .jsonl, optionally .gz/.xz)")
    parser.add_argument("--output-prefix", required=True,
                        help="write PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default="byte",
                        help="byte, gpt2 or the path of a tokenizer.json")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--json-key", default="text", help="the text field of JSON lines")
    parser.add_argument("--append-eod", action="store_true",
                        help="end every document with the tokenizer's end-of-text id")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    parser.add_argument("--summary-json", default=None, help="also write the summary here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = preprocess(args.input, args.output_prefix, args.tokenizer, args.workers,
                             args.json_key, args.append_eod, progress=not args.no_progress)
    except (FileNotFoundError, KeyError, ValueError, ImportError) as error:
        print(f"preprocess_data: error: {error}", file=sys.stderr)
        return 2
    print(summary.line())
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
