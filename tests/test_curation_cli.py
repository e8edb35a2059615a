"""The curation tools as commands: every flag issue 15 names takes effect (dedup's --threshold,
--exact, --ngram, --num-perm, --bands/--rows, --workers, --text-key, --id-key, --keep longest;
decontaminate's several --eval files, --ngram, --output, its 200-character default margin and its
report per evaluation set), each tool drives a progress bar over its whole input, and memory
follows the number of documents, not their text."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import tracemalloc
from pathlib import Path

import pytest

pytest.importorskip("datasketch")

import nanomt.curation.stream as stream  # noqa: E402
from nanomt.curation.decontaminate import DecontamOptions, decontaminate  # noqa: E402
from nanomt.curation.dedup import (SHINGLE_CHUNK, DedupOptions, deduplicate,  # noqa: E402
                                   make_minhash, shingles, update_in_chunks)
from nanomt.curation.quality import filter_quality  # noqa: E402
from nanomt.curation.synthetic import (document, near_duplicate, read_jsonl,  # noqa: E402
                                       respace, sentence, vocabulary, write_jsonl)

ROOT = Path(__file__).resolve().parent.parent
RNG, VOCAB = random.Random(11), vocabulary(3000, 11)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"cli_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dedup_corpus(tmp_path: Path) -> Path:
    """Under other keys: a document, a longer near-copy of it (one phrase edited, one sentence
    added), a distinct document and a copy of that with other case and spacing."""
    base = document(RNG, VOCAB, 300)
    longer = near_duplicate(base, RNG, VOCAB, fraction=0.01, run=(3, 3)) + " " + \
        sentence(RNG, VOCAB, 10)
    other = document(RNG, VOCAB, 300)
    records = [("a", base), ("b", document(RNG, VOCAB, 300)), ("a_longer", longer),
               ("c", other), ("c_respaced", respace(other, RNG))]
    return write_jsonl(tmp_path / "in.jsonl", [{"key": k, "body": t} for k, t in records])


def run_dedup(tmp_path: Path, name: str, *flags: str) -> tuple[dict, dict]:
    """(removed id -> removed record, summary) of tools/dedup.py with `flags`."""
    out = tmp_path / f"{name}.jsonl"
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--no-progress",
            "--text-key", "body", "--id-key", "key", *flags]
    assert load_tool("dedup").main(argv) == 0
    removed = {r["key"]: r for r in read_jsonl(tmp_path / f"{name}.removed.jsonl")}
    return removed, json.loads((tmp_path / f"{name}.summary.json").read_text())


def test_dedup_flags_take_effect(tmp_path):
    dedup_corpus(tmp_path)
    removed, summary = run_dedup(tmp_path, "all", "--threshold", "0.8", "--ngram", "4",
                                 "--num-perm", "64", "--bands", "8", "--rows", "8",
                                 "--keep", "longest", "--workers", "2")
    assert set(removed) == {"a", "c"}  # the longest in characters: the respaced copy's spaces
    assert removed["a"]["duplicate_of"] == "a_longer" and removed["a"]["reason"] == "fuzzy"
    assert removed["c"]["duplicate_of"] == "c_respaced" and removed["c"]["similarity"] == 1
    assert (removed["a"]["similarity"] * 64) % 1 < 1e-6  # Ĵ counts agreeing rows of 64
    assert {k: summary[k] for k in ("threshold", "ngram", "num_perm", "bands", "rows", "keep",
                                    "workers")} == {"threshold": 0.8, "ngram": 4, "num_perm": 64,
                                                    "bands": 8, "rows": 8, "keep": "longest",
                                                    "workers": 2}
    removed, summary = run_dedup(tmp_path, "first", "--workers", "1")  # defaults: keep first
    assert set(removed) == {"a_longer", "c_respaced"} and removed["a_longer"]["duplicate_of"] == "a"
    assert summary["num_perm"] == 128 and summary["bands"] * summary["rows"] <= 128
    removed, summary = run_dedup(tmp_path, "exact", "--exact", "--workers", "1")
    assert set(removed) == {"c_respaced"} and summary["mode"] == "exact"
    removed, _ = run_dedup(tmp_path, "strict", "--threshold", "0.99", "--workers", "1")
    assert set(removed) == {"c_respaced"}  # the near-copy is below 0.99


def test_decontaminate_command_line(tmp_path, capsys):
    squad = [{"text": sentence(RNG, VOCAB, 30)} for _ in range(5)]
    race = [{"text": sentence(RNG, VOCAB, 30)} for _ in range(5)]
    write_jsonl(tmp_path / "squad.jsonl", squad)
    write_jsonl(tmp_path / "race.jsonl", race)
    body = document(RNG, VOCAB, 400)
    at = body.find(". ", len(body) // 2) + 2
    phrase = " ".join(race[2]["text"].split()[5:18])  # 13 words
    docs = [{"id": "hit", "text": body[:at] + phrase + " " + body[at:]}]
    docs += [{"id": f"clean{i}", "text": document(RNG, VOCAB, 200)} for i in range(5)]
    write_jsonl(tmp_path / "in.jsonl", docs)
    tool = load_tool("decontaminate")
    argv = ["--input", str(tmp_path / "in.jsonl"), "--eval", str(tmp_path / "squad.jsonl"),
            str(tmp_path / "race.jsonl"), "--ngram", "13", "--output", str(tmp_path / "out.jsonl"),
            "--workers", "1", "--no-progress"]
    args = tool.parse_args(argv)
    assert (args.margin, args.min_piece, args.max_pieces) == (200, 200, 10)
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "squad: {'examples': 5" in printed and "race: {'examples': 5" in printed
    report = json.loads((tmp_path / "out.summary.json").read_text())["eval_sets"]
    assert report["race"]["documents_matched"] == 1 and report["squad"]["documents_matched"] == 0
    by_id = {d["id"]: d["text"] for d in read_jsonl(tmp_path / "out.jsonl")}
    text = docs[0]["text"]
    assert by_id["hit#0"] == text[:at - 200].strip()
    assert by_id["hit#1"] == text[at + len(phrase) + 200:].strip()
    assert all(by_id[d["id"]] == d["text"] for d in docs[1:])


def test_each_tool_drives_a_progress_bar_over_its_input(tmp_path, monkeypatch):
    bars = []

    class Recorded(stream.tqdm):  # shown even though the tests' stderr is not a terminal
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
            bars.append(self)

    monkeypatch.setattr(stream, "tqdm", Recorded)
    path = write_jsonl(tmp_path / "in.jsonl",
                       [{"text": document(RNG, VOCAB, 100)} for _ in range(20)])
    write_jsonl(tmp_path / "eval.jsonl", [{"text": sentence(RNG, VOCAB, 20)}])
    deduplicate(path, tmp_path / "d.jsonl", DedupOptions(batch_size=4))
    decontaminate(path, [tmp_path / "eval.jsonl"], tmp_path / "c.jsonl")
    filter_quality(path, tmp_path / "q.jsonl", batch_size=4)
    size = path.stat().st_size
    assert [b.desc for b in bars] == ["dedup: sign", "dedup: write", "decontaminate",
                                      "filter_quality"]
    assert all(b.total == size and b.n == size for b in bars)
    assert all("100%" in b.fp.getvalue() for b in bars)


def peak_bytes(step) -> int:
    tracemalloc.start()
    try:
        step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("tool", ["dedup", "decontaminate"])
def test_memory_follows_documents_not_text(tool, tmp_path):
    """40 and 160 documents of 1,500 words (in this process, workers=1, 4 documents a batch):
    the peak memory grows by far less than the text (dedup keeps about 1 KB per document)."""
    write_jsonl(tmp_path / "eval.jsonl", [{"text": sentence(RNG, VOCAB, 20)}])
    peaks, sizes = [], []
    for count in (40, 160):
        path = write_jsonl(tmp_path / f"in{count}.jsonl",
                           [{"text": document(RNG, VOCAB, 1500)} for _ in range(count)])
        out = tmp_path / f"out{count}.jsonl"
        if tool == "dedup":
            step = lambda: deduplicate(path, out, DedupOptions(batch_size=4),  # noqa: E731
                                       progress=False)
        else:
            step = lambda: decontaminate(path, [tmp_path / "eval.jsonl"], out,  # noqa: E731
                                         DecontamOptions(batch_size=4), progress=False)
        peaks.append(peak_bytes(step))
        sizes.append(path.stat().st_size)
    assert sizes[1] - sizes[0] > 1.0e6
    assert peaks[1] - peaks[0] < 0.2 * (sizes[1] - sizes[0]), (peaks, sizes)


def test_dedup_memory_of_a_long_document(tmp_path):
    """A 40,000-word document (235 KB) is signed in chunks of shingles: the peak is its shingle set
    and a chunk's temporaries (7.6 MB measured), where one update_batch of all 40,000 shingles
    makes k x 40,000 arrays of 64-bit numbers (48 MB measured)."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": document(RNG, VOCAB, 40_000)}])
    peak = peak_bytes(lambda: deduplicate(path, tmp_path / "out.jsonl", progress=False))
    assert peak < 15 * 2**20, peak
    text = read_jsonl(path)[0]["text"]  # the chunks give the signature of one batch
    whole, chunked = make_minhash(128, 1), make_minhash(128, 1)
    whole.update_batch(list(shingles(text, 5)))
    update_in_chunks(chunked, shingles(text, 5))
    assert len(shingles(text, 5)) > 4 * SHINGLE_CHUNK and whole == chunked
