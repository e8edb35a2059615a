"""Data for nanomt: an embedded offline corpus, tokenizers and a layout-independent batch sampler."""

from nanomt.data.dataset import (
    CORPUS_PATH,
    GlobalBatchSampler,
    load_token_splits,
    load_tokens,
    split_tokens,
)
from nanomt.data.tokenizer import (
    ByteTokenizer,
    GPT2Tokenizer,
    HFTokenizerFile,
    Tokenizer,
    build_tokenizer,
)

__all__ = [
    "CORPUS_PATH",
    "ByteTokenizer",
    "GPT2Tokenizer",
    "GlobalBatchSampler",
    "HFTokenizerFile",
    "Tokenizer",
    "build_tokenizer",
    "load_token_splits",
    "load_tokens",
    "split_tokens",
]
