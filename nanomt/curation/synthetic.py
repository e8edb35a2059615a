"""Generated corpora for the curation tests and benchmark, with what each step must find planted.

Text is sentences of words drawn from a random vocabulary plus English stop words, so distinct
documents share almost no 5-grams (as distinct web pages share few) while passing the quality
rules. Near-duplicates change a few percent of the words in short runs (an edited phrase, a new
date or name), as copies of one page on the web differ.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterable
from pathlib import Path

STOP_WORDS = ["the", "of", "and", "to", "a", "in", "that", "is", "with", "for", "on", "be"]


def vocabulary(size: int, seed: int = 0) -> list[str]:
    """`size` distinct lower-case pseudo-words of 2 to 10 letters (mean about 6)."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        length = min(10, max(2, int(rng.gauss(6, 2))))
        words.add("".join(rng.choices(string.ascii_lowercase, k=length)))
    return sorted(words)


def sentence(rng: random.Random, vocab: list[str], length: int) -> str:
    """`length` words, about a quarter of them stop words, capitalised, ending in a full stop."""
    words = [rng.choice(STOP_WORDS) if rng.random() < 0.25 else rng.choice(vocab)
             for _ in range(length)]
    return " ".join(words).capitalize() + "."


def document(rng: random.Random, vocab: list[str], num_words: int,
             sentences_per_line: int = 4) -> str:
    """About `num_words` words of sentences, `sentences_per_line` sentences to a line."""
    sentences, total = [], 0
    while total < num_words:
        length = rng.randint(8, 20)
        sentences.append(sentence(rng, vocab, length))
        total += length
    lines = [" ".join(sentences[i:i + sentences_per_line])
             for i in range(0, len(sentences), sentences_per_line)]
    return "\n".join(lines)


def near_duplicate(text: str, rng: random.Random, vocab: list[str], fraction: float = 0.03,
                   run: tuple[int, int] = (2, 4)) -> str:
    """`text` with `fraction` of its words replaced, in runs of run[0]..run[1] consecutive words."""
    words = text.split(" ")
    to_change = max(1, round(fraction * len(words)))
    while to_change > 0:
        length = min(to_change, rng.randint(*run))
        start = rng.randrange(0, max(1, len(words) - length))
        for i in range(start, start + length):
            words[i] = rng.choice(vocab)
        to_change -= length
    return " ".join(words)


def respace(text: str, rng: random.Random) -> str:
    """The same words with other case and spacing (an exact duplicate after normalisation)."""
    words = text.split()
    spaced = [w.upper() if rng.random() < 0.3 else w for w in words]
    gaps = [rng.choice([" ", "  ", "\n", "\t "]) for _ in words]
    return "  " + "".join(w + g for w, g in zip(spaced, gaps))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
