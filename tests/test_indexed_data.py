"""The indexed token format (.bin + .idx), checked against an independent struct-based reference.

The reference writer and reader below are written from the byte layout alone (nanomt/data/
indexed.py's docstring, Megatron-LM's format), sharing no code with nanomt, so a layout mistake in
either shows up as a mismatch.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from nanomt.data.indexed import IndexedDataset, IndexedFormatError, IndexedWriter, smallest_dtype
from nanomt.data.preprocess import paragraphs

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the reference: the layout written out with struct, nothing else -------------------------
REF_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6,
             "float32": 7, "uint16": 8}
REF_FORMATS = {1: "B", 2: "b", 3: "h", 4: "i", 5: "q", 6: "d", 7: "f", 8: "H"}


def reference_write(prefix: Path, docs: list[list[int]], dtype: str) -> None:
    code = REF_CODES[dtype]
    fmt = REF_FORMATS[code]
    size = struct.calcsize(fmt)
    with open(f"{prefix}.bin", "wb") as f:
        for doc in docs:
            f.write(struct.pack(f"<{len(doc)}{fmt}", *doc))
    n = len(docs)
    pointers, at = [], 0
    for doc in docs:
        pointers.append(at)
        at += len(doc) * size
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", n))
        f.write(struct.pack("<Q", n + 1))
        f.write(struct.pack(f"<{n}i", *[len(d) for d in docs]))
        f.write(struct.pack(f"<{n}q", *pointers))
        f.write(struct.pack(f"<{n + 1}q", *range(n + 1)))


def reference_read(prefix: Path) -> tuple[int, list[list[int]]]:
    """(dtype code, documents) of a pair, reading sequences and grouping them by document."""
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    assert version == 1
    (code,) = struct.unpack_from("<B", raw, 17)
    n, d = struct.unpack_from("<QQ", raw, 18)
    lengths = struct.unpack_from(f"<{n}i", raw, 34)
    pointers = struct.unpack_from(f"<{n}q", raw, 34 + 4 * n)
    doc_index = struct.unpack_from(f"<{d}q", raw, 34 + 12 * n)
    assert len(raw) == 34 + 12 * n + 8 * d
    fmt = REF_FORMATS[code]
    size = struct.calcsize(fmt)
    data = Path(f"{prefix}.bin").read_bytes()
    sequences = [list(struct.unpack_from(f"<{ln}{fmt}", data, p))
                 for ln, p in zip(lengths, pointers)]
    for i in range(1, n):
        assert pointers[i] == pointers[i - 1] + lengths[i - 1] * size
    docs = [sum(sequences[doc_index[k]:doc_index[k + 1]], []) for k in range(d - 1)]
    return code, docs


DOCS = [[1, 2, 3], [], [65535 // 3, 7], [9] * 10]


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_round_trip_and_exact_header(tmp_path, dtype, code):
    docs = [[t % 60000 for t in d] for d in DOCS] if dtype == np.uint16 else \
        DOCS + [[100_000, 2**31 - 1]]
    writer = IndexedWriter(tmp_path / "ds", dtype)
    for doc in docs:
        writer.add_document(doc)
    writer.finish()
    raw = (tmp_path / "ds.idx").read_bytes()
    n = len(docs)
    assert raw[:34] == (b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + bytes([code])
                        + n.to_bytes(8, "little") + (n + 1).to_bytes(8, "little"))
    assert reference_read(tmp_path / "ds") == (code, docs)
    reference_write(tmp_path / "ref", docs, np.dtype(dtype).name)
    assert (tmp_path / "ref.idx").read_bytes() == raw
    assert (tmp_path / "ref.bin").read_bytes() == (tmp_path / "ds.bin").read_bytes()
    ds = IndexedDataset(tmp_path / "ref")
    assert ds.dtype == np.dtype(dtype) and ds.num_documents == n
    assert [ds.document(k).tolist() for k in range(n)] == docs
    assert ds.document(3, offset=2, length=3).tolist() == docs[3][2:5]
    assert ds.num_tokens == sum(map(len, docs))


def test_megatron_multi_sequence_documents(tmp_path):
    """Megatron may store a document as several sequences: documents are read whole."""
    seqs = [[1, 2], [3], [4, 5, 6], [7]]
    reference_write(tmp_path / "seq", seqs, "int32")
    raw = bytearray((tmp_path / "seq.idx").read_bytes())
    # rewrite the document index as [0, 2, 4]: two documents of two sequences each
    head = raw[:26] + struct.pack("<Q", 3) + raw[34:34 + 12 * 4]
    (tmp_path / "seq.idx").write_bytes(bytes(head) + struct.pack("<3q", 0, 2, 4))
    ds = IndexedDataset(tmp_path / "seq")
    assert ds.num_documents == 2
    assert ds.document_lengths.tolist() == [3, 4]
    assert ds.document(1).tolist() == [4, 5, 6, 7]


def test_smallest_dtype():
    assert smallest_dtype(256) == np.uint16 and smallest_dtype(50257) == np.uint16
    assert smallest_dtype(65500) == np.int32 and smallest_dtype(128256) == np.int32


def test_format_errors(tmp_path):
    reference_write(tmp_path / "ok", [[1, 2, 3], [4, 5]], "uint16")
    idx, bin_ = (tmp_path / "ok.idx").read_bytes(), (tmp_path / "ok.bin").read_bytes()

    def pair(name: str, idx_bytes: bytes | None, bin_bytes: bytes | None) -> Path:
        if idx_bytes is not None:
            (tmp_path / f"{name}.idx").write_bytes(idx_bytes)
        if bin_bytes is not None:
            (tmp_path / f"{name}.bin").write_bytes(bin_bytes)
        return tmp_path / name

    cases = {
        "index file not found": pair("noidx", None, bin_),
        "data file not found": pair("nobin", idx, None),
        "magic": pair("magic", b"XXIDIDX\x00\x00" + idx[9:], bin_),
        "version 2": pair("version", idx[:9] + struct.pack("<Q", 2) + idx[17:], bin_),
        "truncated: 20 bytes, shorter than the 34-byte header": pair("short", idx[:20], bin_),
        "ok.idx is truncated|trunc.idx is truncated": pair("trunc", idx[:-3], bin_),
        "truncbin.bin is truncated: 8 bytes": pair("truncbin", idx, bin_[:8]),
        "unknown dtype code 9": pair("code", idx[:17] + bytes([9]) + idx[18:], bin_),
    }
    for message, prefix in cases.items():
        with pytest.raises(IndexedFormatError, match=message):
            IndexedDataset(prefix)


def test_paragraph_documents_put_back_together():
    text = "a\nb\n\n\nc\n\nd\n  \ne"
    docs = list(paragraphs(iter(text.splitlines(keepends=True))))
    assert docs == ["a\nb\n\n\n", "c\n\n", "d\n  \n", "e"]
    assert "".join(docs) == text


def test_preprocess_tool_text_and_jsonl(tmp_path):
    tool = load_tool("preprocess_data")
    (tmp_path / "a.txt").write_text("Hello world.\n\nSecond para\nstill.\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "ünï"}) + "\n"
                                      + json.dumps({"body": "x"}) + "\n")
    out = tmp_path / "out" / "corpus"
    for workers in (1, 2):
        prefix = Path(f"{out}{workers}")
        code = tool.main(["--input", str(tmp_path / "a.txt"), str(tmp_path / "*.jsonl"),
                          "--output-prefix", str(prefix), "--workers", str(workers),
                          "--json-key", "body", "--no-progress"])
        assert code == 0
        code_read, docs = reference_read(prefix)
        assert code_read == 8  # uint16 for the byte tokenizer
        expected = ["Hello world.\n\n", "Second para\nstill.\n", "ünï", "x"]
        assert docs == [list(d.encode()) for d in expected]
    assert Path(f"{out}1.bin").read_bytes() == Path(f"{out}2.bin").read_bytes()
    assert Path(f"{out}1.idx").read_bytes() == Path(f"{out}2.idx").read_bytes()
    assert tool.main(["--input", str(tmp_path / "none*.txt"), "--output-prefix",
                      str(out)]) == 2
    assert tool.main(["--input", str(tmp_path / "a.txt"), "--output-prefix", str(out),
                      "--append-eod"]) == 2  # the byte tokenizer has no end-of-text id


def test_train_tokenizer_then_preprocess_with_eod(tmp_path):
    pytest.importorskip("tokenizers")
    from nanomt.data import build_tokenizer

    text = "".join(f"the {w} sat on the mat. the {w} ran.\n\n" for w in
                   ("cat", "dog", "bird", "fish") * 20)
    (tmp_path / "c.txt").write_text(text)
    trainer = load_tool("train_tokenizer")
    assert trainer.main(["--input", str(tmp_path / "c.txt"), "--output",
                         str(tmp_path / "tok" / "tokenizer.json"), "--vocab-size", "300"]) == 0
    tok = build_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))
    assert 257 < tok.vocab_size <= 300 and tok.eot_id is not None
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the cat sat on the mat.")) < len("the cat sat on the mat.")
    tool = load_tool("preprocess_data")
    assert tool.main(["--input", str(tmp_path / "c.txt"), "--output-prefix",
                      str(tmp_path / "bpe"), "--tokenizer", str(tmp_path / "tok" /
                                                                "tokenizer.json"),
                      "--append-eod", "--workers", "2", "--no-progress"]) == 0
    _, docs = reference_read(tmp_path / "bpe")
    assert len(docs) == 80 and all(d[-1] == tok.eot_id for d in docs)
    assert tok.decode(sum((d[:-1] for d in docs), [])) == text


def test_preprocess_tool_reports_progress_and_a_summary(tmp_path, capsys):
    tool = load_tool("preprocess_data")
    (tmp_path / "a.txt").write_text("one two\n\nthree\n")
    assert tool.main(["--input", str(tmp_path / "a.txt"), "--output-prefix",
                      str(tmp_path / "p"), "--summary-json", str(tmp_path / "s.json")]) == 0
    out, err = capsys.readouterr()
    assert err.rstrip("\n").rsplit("\r", 1)[-1].split()[:2] == ["0.0", "MB"]
    assert "MB/s" in err and "M tokens/s" in err and err.endswith("\n")
    assert out.startswith("2 documents, 15 tokens (uint16) from 1 file(s), 0.0 MB in ")
    assert "MB/s, " in out and "M tokens/s) -> " in out and out.rstrip().endswith("p.bin/.idx")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["documents"], summary["tokens"], summary["input_bytes"]) == (2, 15, 15)
