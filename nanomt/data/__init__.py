"""Data for nanomt: indexed token files, GPT sample streams, blends, ramp-up and the sampler.

    indexed.py      the .bin/.idx format Megatron-LM reads (write, memory-map, check)
    preprocess.py   text / JSON lines -> indexed files, streaming, several workers
    gpt_dataset.py  samples of seq_len + 1 tokens across documents, shuffled per epoch
    blend.py        weighted blends whose every prefix keeps each source near its weight
    rampup.py       batch-size ramp-up over consumed samples
    sampler.py      the global batch of each step and each rank's slice of it
    build.py        the data.* config -> train and validation streams
    tokenizer.py    byte, GPT-2 BPE and tokenizer.json tokenizers
"""

from nanomt.data.dataset import CORPUS_PATH, SHAKESPEARE
from nanomt.data.rampup import BatchSchedule
from nanomt.data.sampler import GlobalBatchSampler
from nanomt.data.tokenizer import (
    ByteTokenizer,
    GPT2Tokenizer,
    HFTokenizerFile,
    Tokenizer,
    build_tokenizer,
)

__all__ = [
    "CORPUS_PATH",
    "SHAKESPEARE",
    "BatchSchedule",
    "ByteTokenizer",
    "GPT2Tokenizer",
    "GlobalBatchSampler",
    "HFTokenizerFile",
    "Tokenizer",
    "build_tokenizer",
]
