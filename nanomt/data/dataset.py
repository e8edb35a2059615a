"""The embedded corpus and what identifies a tokenizer: the two facts every data source shares.

Training reads every corpus through one path (nanomt.data.build): text files, the embedded
Shakespeare included, are preprocessed once into an indexed dataset in the cache
(nanomt.data.preprocess), keyed by the file's hash and `tokenizer_fingerprint`.
"""

from __future__ import annotations

from pathlib import Path

from nanomt.data.tokenizer import Tokenizer

SHAKESPEARE = "shakespeare"
CORPUS_PATH = Path(__file__).parent / "corpus" / "shakespeare.txt.xz"
_PROBE_TEXT = "The quick brown fox <|endoftext|> jumps over\n\n  1234 lazy dogs. Ünïcödé ✓ 🙂"


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Identify a tokenizer for caching: its name, sizes and the ids of a probe text."""
    probe = tokenizer.encode(_PROBE_TEXT)
    return f"{tokenizer.name}|{tokenizer.vocab_size}|{tokenizer.eot_id}|{probe}"
