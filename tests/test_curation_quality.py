"""Quality filters (tools/filter_quality.py): each rule removes the bad document planted for it and
keeps good ones; each threshold is an option."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from nanomt.curation.quality import RULES, QualityThresholds, check_document, filter_quality
from nanomt.curation.synthetic import document, read_jsonl, sentence, vocabulary, write_jsonl
from nanomt.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
RNG, VOCAB = random.Random(7), vocabulary(3000, 7)
LONG_WORDS = [w * 3 for w in VOCAB if len(w) >= 5][:500]  # 15+ letters


def good(words: int = 200) -> str:
    return document(RNG, VOCAB, words)


def spread(text: str, insert: Callable[[], str], every: int) -> str:
    """A word from `insert()` after every `every`-th word of `text`."""
    words = text.split(" ")
    return " ".join(w + (" " + insert() if i % every == every - 1 else "")
                    for i, w in enumerate(words))


def bad_documents() -> dict[str, str]:
    """One document per rule that fails it (and passes every rule before it)."""
    menu = "\n".join(" ".join(RNG.choices(VOCAB, k=5)).title() for _ in range(40))
    long_lines = [sentence(RNG, VOCAB, 15) for _ in range(20)]
    passage = " ".join(RNG.choices(VOCAB, k=30))
    return {
        "word_count": sentence(RNG, VOCAB, 30),
        "mean_word_length": " ".join(sentence(RNG, LONG_WORDS, 12) for _ in range(10)),
        "symbol_ratio": spread(good(), lambda: "#" + RNG.choice(VOCAB), 6),
        "alpha_words": spread(good(), lambda: str(RNG.randint(10, 99999)), 3),
        "line_punctuation": menu,
        "repeated_lines": "\n".join(line + "\nRead more." for line in long_lines[:15]),
        "repeated_line_chars": "\n".join(long_lines[:10] + [long_lines[0]] * 3),
        "top_ngram": spread(good(), lambda: "amazing discount", 6),
        "duplicate_ngrams": " ".join([good(100), passage + ".", good(60), passage + ".",
                                      good(60), passage + "."]),
    }


BAD = bad_documents()
GOOD = [good(RNG.randint(80, 600)) for _ in range(30)]


def test_good_documents_pass_every_rule():
    for text in GOOD:
        assert check_document(text, QualityThresholds()) is None


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_removes_its_bad_document(rule):
    verdict = check_document(BAD[rule], QualityThresholds())
    assert verdict is not None and verdict[0] == rule, verdict
    # with that rule off, the document passes or fails only a later rule
    later = check_document(BAD[rule], QualityThresholds(), frozenset({rule}))
    assert later is None or list(RULES).index(later[0]) > list(RULES).index(rule)


def test_filter_corpus_reports_per_rule(tmp_path):
    docs = [{"id": f"good{i}", "text": t} for i, t in enumerate(GOOD)]
    docs += [{"id": f"bad_{rule}", "text": text} for rule, text in BAD.items()]
    RNG.shuffle(docs)
    path = write_jsonl(tmp_path / "in.jsonl", docs)
    summary = filter_quality(path, tmp_path / "out.jsonl", progress=False)
    kept = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(d["id"] for d in kept) == sorted(f"good{i}" for i in range(len(GOOD)))
    removed = read_jsonl(tmp_path / "out.removed.jsonl")
    assert {r["id"]: r["reason"] for r in removed} == {f"bad_{rule}": rule for rule in RULES}
    assert all(r["detail"] and r["text"] == BAD[r["reason"]] for r in removed)
    assert summary.removed == {rule: 1 for rule in RULES}
    assert summary.docs_in == len(docs) and summary.docs_out == len(GOOD)
    # two workers: the same output
    filter_quality(path, tmp_path / "two.jsonl", workers=2, progress=False)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()


def test_thresholds_are_options(tmp_path):
    assert check_document(BAD["word_count"], QualityThresholds(min_words=20)) is None
    assert check_document(GOOD[0], QualityThresholds(min_words=10_000))[0] == "word_count"
    loose = QualityThresholds(max_top_ngram=(0.9, 0.9, 0.9))
    assert check_document(BAD["top_ngram"], loose) is None
    strict = QualityThresholds(max_duplicate_ngrams=(0.0,) * 6)
    assert check_document(BAD["duplicate_ngrams"], strict)[0] == "duplicate_ngrams"
    with pytest.raises(ConfigError, match="needs 3 values"):
        QualityThresholds(max_top_ngram=(0.2,)).check()
    write_jsonl(tmp_path / "in.jsonl", [{"text": GOOD[0]}])
    with pytest.raises(ConfigError, match="unknown rule"):
        filter_quality(tmp_path / "in.jsonl", tmp_path / "out.jsonl", disabled=("nope",))


def test_command_line_flags(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"body": BAD["word_count"]}, {"body": GOOD[0]}])
    spec = importlib.util.spec_from_file_location("filter_quality", ROOT / "tools" /
                                                  "filter_quality.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
            "--text-key", "body", "--workers", "1", "--no-progress"]
    assert tool.main(args) == 0
    assert "removed, word_count: 1" in capsys.readouterr().out
    assert tool.main(args + ["--min-words", "20", "--max-top-ngram", "0.5,0.5,0.5"]) == 0
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2
    assert tool.main(args + ["--disable", "word_count"]) == 0
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2
