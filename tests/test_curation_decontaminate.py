"""Decontamination (tools/decontaminate.py): planted 13-gram overlaps with evaluation sets are cut
out with a 200-character margin and the documents split there; unrelated documents are untouched."""

from __future__ import annotations

import json
import random

import pytest

from nanomt.curation.decontaminate import (DecontamOptions, cut, decontaminate,
                                           normalised_words, words_with_spans)
from nanomt.curation.synthetic import document, read_jsonl, sentence, vocabulary, write_jsonl
from nanomt.errors import ConfigError

RNG_SEED = 5


def plant(text: str, phrase: str, at: float) -> tuple[str, int, int]:
    """`phrase` inserted into `text` at the sentence boundary nearest `at` (a fraction of its
    length); returns the new text and the phrase's (start, end) in it."""
    position = text.find(". ", int(at * len(text))) + 2
    new = text[:position] + phrase + " " + text[position:]
    return new, position, position + len(phrase)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two evaluation sets and a corpus with one document per case, plus 40 unrelated ones."""
    tmp = tmp_path_factory.mktemp("decontam")
    rng, vocab = random.Random(RNG_SEED), vocabulary(3000, RNG_SEED)
    lambada = [{"text": sentence(rng, vocab, 40)} for _ in range(20)]
    piqa = [{"goal": sentence(rng, vocab, 20), "sol1": sentence(rng, vocab, 25), "label": 0}
            for _ in range(20)]
    write_jsonl(tmp / "lambada.jsonl", lambada)
    write_jsonl(tmp / "piqa.jsonl", piqa)
    words = lambada[3]["text"].split()
    # the 13 words with other case and punctuation: they match after normalisation
    thirteen = " ".join(w.upper() if i % 2 else w + "," for i, w in enumerate(words[10:23]))
    cases = {}
    cases["split"] = plant(document(rng, vocab, 400), thirteen, 0.5)
    cases["twelve_words"] = plant(document(rng, vocab, 400), " ".join(words[10:22]), 0.5)
    cases["near_start"] = plant(document(rng, vocab, 400), piqa[7]["sol1"], 0.0)
    many = document(rng, vocab, 1500)
    for k in range(11):  # 11 matches far apart: 12 pieces > 10
        many = plant(many, " ".join(words[k:k + 13]), (k + 0.5) / 11.5)[0]
    cases["many"] = (many, 0, 0)
    cases["short"] = plant(sentence(rng, vocab, 20) + " " + sentence(rng, vocab, 20), thirteen, 0)
    docs = [{"id": name, "text": text, "url": f"https://example.com/{name}"}
            for name, (text, _, _) in cases.items()]
    docs += [{"id": f"clean{i}", "text": document(rng, vocab, 200)} for i in range(40)]
    rng.shuffle(docs)
    corpus = write_jsonl(tmp / "corpus.jsonl", docs)
    return tmp, corpus, cases, docs


def run(setup, workers=1, **options):
    tmp, corpus, _, _ = setup
    out = tmp / f"out_w{workers}_{len(options)}.jsonl"
    summary = decontaminate(corpus, [tmp / "lambada.jsonl", tmp / "piqa.jsonl"], out,
                            DecontamOptions(**options), workers=workers, progress=False)
    return summary, out


def test_planted_overlap_is_cut_out_and_split(setup):
    tmp, corpus, cases, docs = setup
    summary, out = run(setup)
    written = read_jsonl(out)
    by_id = {d["id"]: d for d in written}
    text, start, end = cases["split"]
    assert by_id["split#0"]["text"] == text[:start - 200].strip()
    assert by_id["split#1"]["text"] == text[end + 200:].strip()
    assert by_id["split#0"]["url"] == "https://example.com/split"  # other fields carried over
    text, start, end = cases["near_start"]  # the piece before the match is under 200 characters
    assert start < 200 and by_id["near_start#0"]["text"] == text[end + 200:].strip()
    assert "near_start#1" not in by_id
    assert not any(d["id"].startswith(("many", "short")) for d in written)
    # unrelated documents and a 12-word overlap are written back byte for byte
    input_lines = {d["id"]: line for d, line in zip(docs, corpus.read_text().splitlines())}
    output_lines = out.read_text().splitlines()
    untouched = [i for i in input_lines if i.startswith("clean")] + ["twelve_words"]
    assert all(input_lines[i] in output_lines for i in untouched)
    assert len(written) == len(untouched) + 3

    assert summary.removed == {"too_many_pieces": 1, "no_piece_long_enough": 1}
    d = summary.details
    assert d["documents_contaminated"] == 4 and d["pieces_written"] == 3
    assert d["eval_sets"]["lambada"]["documents_matched"] == 3
    assert d["eval_sets"]["piqa"]["documents_matched"] == 1
    assert d["eval_sets"]["piqa"]["examples"] == 20 and d["eval_sets"]["lambada"]["ngrams"] > 0
    removed = {r["id"]: r for r in read_jsonl(out.with_name(out.stem + ".removed.jsonl"))}
    assert removed["many"]["pieces"] == 12 and removed["many"]["pieces_kept"] == 0
    assert removed["near_start"]["eval_sets"] == ["piqa"]
    assert json.loads(out.with_name(out.stem + ".summary.json").read_text())["docs_in"] == len(docs)


def test_thresholds_are_options(setup):
    _, out = run(setup, margin=0, min_piece=0, max_pieces=20)
    by_id = {d["id"]: d["text"] for d in read_jsonl(out)}
    cases = setup[2]
    text, start, end = cases["split"]
    assert by_id["split#0"] == text[:start].strip() and by_id["split#1"] == text[end:].strip()
    assert sum(i.startswith("many#") for i in by_id) == 12
    _, out = run(setup, ngram=12)  # now the 12-word overlap counts
    assert "twelve_words" not in {d["id"] for d in read_jsonl(out)}


def test_two_workers_give_the_same_result(setup):
    _, one = run(setup, workers=1)
    _, two = run(setup, workers=2)
    assert one.read_bytes() != b"" and two.read_bytes() == one.read_bytes()


def test_normalisation_and_cut():
    assert normalised_words("The  Cat's, (SAT) -- on the mat!") == \
        ["the", "cats", "sat", "on", "the", "mat"]
    words, spans = words_with_spans("The  Cat's, -- mat!")
    assert words == ["the", "cats", "mat"] and spans == [(0, 3), (5, 11), (15, 19)]
    text = "a" * 50 + "MATCH" + "b" * 50 + "MATCH" + "c" * 50
    # windows of 10 around both matches overlap nothing: three pieces
    assert cut(text, [(50, 55, 1), (105, 110, 1)], 10) == ["a" * 40, "b" * 30, "c" * 40]
    # windows of 30 overlap and merge: two pieces
    assert cut(text, [(50, 55, 1), (105, 110, 1)], 30) == ["a" * 20, "c" * 20]


def test_bad_evaluation_file(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    (tmp_path / "eval.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ConfigError, match="eval.jsonl:2: not valid JSON"):
        decontaminate(tmp_path / "in.jsonl", [tmp_path / "eval.jsonl"], tmp_path / "out.jsonl",
                      progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="has no examples"):
        decontaminate(tmp_path / "in.jsonl", [tmp_path / "empty.jsonl"], tmp_path / "out.jsonl",
                      progress=False)
    assert not (tmp_path / "out.jsonl").exists()
