"""Deduplication (tools/dedup.py) on generated corpora, and the bad-input errors of all three
curation tools. Near-duplicates are planted with a few percent of their words changed; the test
measures precision and recall at the paper's threshold (Jaccard 0.8) against what was planted."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("datasketch")

from nanomt.curation.dedup import (DedupOptions, candidate_probability,  # noqa: E402
                                   choose_bands, deduplicate, make_minhash, shingles)
from nanomt.curation.synthetic import (document, near_duplicate, read_jsonl,  # noqa: E402
                                       respace, sentence, vocabulary, write_jsonl)
from nanomt.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def jaccard(a: str, b: str, n: int = 5) -> float:
    """The true Jaccard similarity of two texts' shingle sets (what MinHash estimates)."""
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb)


def planted_corpus(seed: int = 0, base: int = 800, near: int = 120, related: int = 60):
    """`base` distinct documents, then (shuffled) `near` near-duplicates of random base documents
    (3% of words changed, in runs of 3-6) and `related` documents sharing the first 60% of a base
    document's words (Jaccard about 0.4: similar but not duplicates, they must be kept)."""
    rng, vocab = random.Random(seed), vocabulary(5000, seed)
    docs = [{"id": f"base{i}", "text": document(rng, vocab, rng.randint(150, 400))}
            for i in range(base)]
    planted, extra = {}, []
    for k in range(near):
        j = rng.randrange(base)
        text = near_duplicate(docs[j]["text"], rng, vocab, fraction=0.03, run=(3, 6))
        extra.append({"id": f"near{k}", "text": text, "source": "planted"})
        planted[f"near{k}"] = j
    for k in range(related):
        words = docs[rng.randrange(base)]["text"].split(" ")
        cut = int(0.6 * len(words))
        text = " ".join(words[:cut]) + " " + document(rng, vocab, len(words) - cut)
        extra.append({"id": f"related{k}", "text": text})
    rng.shuffle(extra)
    return docs + extra, planted


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs, planted = planted_corpus()
    path = write_jsonl(tmp_path_factory.mktemp("dedup") / "corpus.jsonl", docs)
    return path, docs, planted


def test_fuzzy_dedup_finds_planted_near_duplicates(corpus, tmp_path):
    path, docs, planted = corpus
    by_id = {d["id"]: d for d in docs}
    # the planted pairs really are above the threshold, the related ones well below
    true_j = {near: jaccard(docs[j]["text"], by_id[near]["text"]) for near, j in planted.items()}
    assert min(true_j.values()) >= 0.84
    assert max(jaccard(by_id[d["id"]]["text"], docs[0]["text"]) for d in docs[1:50]) < 0.1
    related = [d for d in docs if d["id"].startswith("related")]

    summary = deduplicate(path, tmp_path / "out.jsonl", DedupOptions(threshold=0.8),
                          progress=False)
    removed = read_jsonl(tmp_path / "out.removed.jsonl")
    removed_ids = {r["id"] for r in removed}
    found = removed_ids & set(planted)
    precision, recall = len(found) / len(removed_ids), len(found) / len(planted)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    # distinct documents (the originals and the merely related) are all kept
    assert not removed_ids & ({d["id"] for d in docs[:800]} | {d["id"] for d in related})
    for r in removed:  # each points at its original (the first of its cluster) with its J^
        assert r["duplicate_of"] == f"base{planted[r['id']]}" and r["reason"] == "fuzzy"
        assert r["similarity"] >= 0.8 and abs(r["similarity"] - true_j[r["id"]]) < 0.15
        assert r["text"] == by_id[r["id"]]["text"] and r["source"] == "planted"
    # kept lines are the input's lines, unchanged and in order; kept + removed = input
    kept_lines = (tmp_path / "out.jsonl").read_text().splitlines()
    input_lines = path.read_text().splitlines()
    assert kept_lines == [line for line, d in zip(input_lines, docs) if d["id"] not in removed_ids]
    assert summary.docs_in == len(docs) and summary.docs_out + len(removed) == len(docs)
    saved = json.loads((tmp_path / "out.summary.json").read_text())
    assert saved["removed"] == {"fuzzy": len(removed)} and saved["bands"] * saved["rows"] <= 128
    assert saved["docs_per_s"] > 0 and saved["mb_per_s"] > 0


def test_two_workers_give_the_same_result(corpus, tmp_path):
    path, _, _ = corpus
    for workers in (1, 2):
        deduplicate(path, tmp_path / f"w{workers}.jsonl", workers=workers, progress=False)
    for suffix in (".jsonl", ".removed.jsonl"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


def test_exact_duplicates_after_whitespace_and_case_changes(tmp_path):
    rng, vocab = random.Random(1), vocabulary(2000, 1)
    originals = [{"id": f"doc{i}", "text": document(rng, vocab, 120)} for i in range(30)]
    copies = [{"id": f"copy{i}", "text": respace(originals[i]["text"], rng)}
              for i in range(0, 30, 2)]
    one_word = originals[1]["text"].replace(" ", " changed ", 1)
    docs = originals + copies + [{"id": "one_word_changed", "text": one_word}]
    path = write_jsonl(tmp_path / "in.jsonl", docs)

    summary = deduplicate(path, tmp_path / "out.jsonl", DedupOptions(exact_only=True),
                          progress=False)
    removed = read_jsonl(tmp_path / "out.removed.jsonl")
    assert {r["id"] for r in removed} == {c["id"] for c in copies}
    assert all(r["duplicate_of"] == "doc" + r["id"][4:] and r["reason"] == "exact"
               and r["similarity"] == 1.0 for r in removed)
    assert summary.removed == {"exact": len(copies)} and summary.details["bands"] is None
    kept = {d["id"] for d in read_jsonl(tmp_path / "out.jsonl")}
    assert "one_word_changed" in kept and len(kept) == len(docs) - len(copies)
    # the fuzzy mode hashes exactly too, and names those duplicates exact
    deduplicate(path, tmp_path / "fuzzy.jsonl", progress=False)
    reasons = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "fuzzy.removed.jsonl")}
    assert all(reasons[c["id"]] == "exact" for c in copies)
    assert reasons.get("one_word_changed") == "fuzzy"


def test_keep_longest_of_a_cluster(tmp_path):
    rng, vocab = random.Random(2), vocabulary(2000, 2)
    short = document(rng, vocab, 300)
    longer = short + " " + sentence(rng, vocab, 8)
    longest = longer + " " + sentence(rng, vocab, 8)
    docs = [{"id": "short", "text": short}, {"id": "other", "text": document(rng, vocab, 300)},
            {"id": "longest", "text": longest}, {"id": "longer", "text": longer}]
    path = write_jsonl(tmp_path / "in.jsonl", docs)
    for keep, kept in (("first", "short"), ("longest", "longest")):
        deduplicate(path, tmp_path / f"{keep}.jsonl", DedupOptions(keep=keep), progress=False)
        assert [d["id"] for d in read_jsonl(tmp_path / f"{keep}.jsonl")] == \
            [d["id"] for d in docs if d["id"] in (kept, "other")]
        removed = read_jsonl(tmp_path / f"{keep}.removed.jsonl")
        assert {r["duplicate_of"] for r in removed} == {kept} and len(removed) == 2


def test_minhash_estimates_jaccard_and_lsh_bands():
    for true_j in (0.2, 0.5, 0.8):  # sets of 1000 shingles with |A ∩ B| / |A ∪ B| = true_j
        union = 1000
        common = round(true_j * union)
        a = [f"s{i}".encode() for i in range(common + (union - common) // 2)]
        b = [f"s{i}".encode() for i in range(common)] + \
            [f"t{i}".encode() for i in range(union - len(a))]
        ma, mb = make_minhash(256, 1), make_minhash(256, 1)
        ma.update_batch(a)
        mb.update_batch(b)
        assert abs(ma.jaccard(mb) - true_j) < 4 * (true_j * (1 - true_j) / 256) ** 0.5
    b, r = choose_bands(DedupOptions(threshold=0.8, num_perm=128))
    assert b * r <= 128 and candidate_probability(0.9, b, r) > 0.99
    assert candidate_probability(0.8, b, r) > 0.8 and candidate_probability(0.5, b, r) < 0.05
    assert choose_bands(DedupOptions(bands=16, rows=8)) == (16, 8)
    for bad in (DedupOptions(bands=20, rows=8), DedupOptions(bands=4), DedupOptions(threshold=0)):
        with pytest.raises(ConfigError):
            bad.check()


# ---- bad input: one line, exit code 2, no output left behind (all three tools) ------------------
def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BAD_INPUTS = {
    "missing_file": (None, "input file not found"),
    "bad_json": ('{"text": "fine"}\n\n{"text": "broken\n', "in.jsonl:3: not valid JSON"),
    "no_text_key": ('{"text": "fine"}\n{"body": "no text"}\n', "in.jsonl:2: no 'text' key"),
    "not_an_object": ('["a list"]\n', "in.jsonl:1: expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("tool", ["dedup", "decontaminate", "filter_quality"])
def test_bad_input_is_one_line(tool, case, tmp_path, capsys):
    content, message = BAD_INPUTS[case]
    if content is not None:
        (tmp_path / "in.jsonl").write_text(content)
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "an evaluation example"}])
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
            "--workers", "1", "--no-progress"]
    if tool == "decontaminate":
        argv += ["--eval", str(tmp_path / "eval.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool).main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("nanomt: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"eval.jsonl"} | ({"in.jsonl"} if content is not None else set()))


def test_dedup_command_line(tmp_path, capsys):
    rng, vocab = random.Random(3), vocabulary(2000, 3)
    text = document(rng, vocab, 200)
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": text}, {"id": 2, "text": text.upper()},
                                        {"id": 3, "text": document(rng, vocab, 200)}])
    assert load_tool("dedup").main(["--input", str(tmp_path / "in.jsonl"), "--output",
                                    str(tmp_path / "out.jsonl"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dedup: 3 documents in, 2 out, 1 removed") and "docs/s" in out
    assert [r["id"] for r in read_jsonl(tmp_path / "out.removed.jsonl")] == [2]


def test_empty_input_gives_empty_outputs(tmp_path):
    from nanomt.curation.decontaminate import decontaminate
    from nanomt.curation.quality import filter_quality

    (tmp_path / "in.jsonl").write_text("\n")
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "an evaluation example"}])
    steps = {"dedup": lambda out: deduplicate(tmp_path / "in.jsonl", out, progress=False),
             "decontaminate": lambda out: decontaminate(tmp_path / "in.jsonl",
                                                        [tmp_path / "eval.jsonl"], out,
                                                        progress=False),
             "filter_quality": lambda out: filter_quality(tmp_path / "in.jsonl", out,
                                                          progress=False)}
    for name, step in steps.items():
        summary = step(tmp_path / f"{name}.jsonl")
        assert summary.docs_in == summary.docs_out == 0
        assert (tmp_path / f"{name}.jsonl").read_text() == ""
        assert (tmp_path / f"{name}.removed.jsonl").read_text() == ""


def test_workers_keep_order_read_boundedly_and_report_a_dead_worker():
    import os

    from nanomt.curation.stream import WorkerDied, map_ordered

    read = []

    def numbers():
        for x in range(-20, 0):
            read.append(x)
            yield x

    results = map_ordered(abs, numbers(), workers=2)
    assert next(results) == (-20, 20) and len(read) <= 2 * 2 + 1  # a window, not the whole input
    assert [r for _, r in results] == list(range(19, 0, -1))
    with pytest.raises(WorkerDied, match="a worker process died"):
        list(map_ordered(os._exit, [1, 2, 3], workers=2))
