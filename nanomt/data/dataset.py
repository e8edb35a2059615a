"""Token streams and a layout-independent batch sampler.

A dataset is one long 1-D stream of token ids, split deterministically into a
train part (the first `1 - val_fraction`) and a validation part (the rest).

Training batches are random windows of that stream, and the central contract
is that the *global* batch of optimizer step `t` is a function of `(seed, t)`
only.  Data-parallel ranks and gradient-accumulation micro-batches merely read
disjoint row ranges of that global batch, so every parallel layout
(dp size x micro-batch size x accumulation steps) trains on exactly the same
data, and a run can be resumed, or re-sharded, at any step.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from nanomt.data.tokenizer import ByteTokenizer, Tokenizer

SHAKESPEARE = "shakespeare"
CORPUS_PATH = Path(__file__).parent / "corpus" / "shakespeare.txt.xz"
TOKEN_DTYPE = torch.int32  # dtype of the streams returned by load_token_splits
_CACHE_VERSION = "nanomt-tokens-v1"
_PROBE_TEXT = "The quick brown fox <|endoftext|> jumps over\n\n  1234 lazy dogs. Ünïcödé ✓ 🙂"


# ---------------------------------------------------------------------------
# Loading token streams
# ---------------------------------------------------------------------------


def read_source_bytes(path: Path) -> bytes:
    """Raw bytes of a text file, decompressing `.xz` and `.gz` files."""
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def _tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Identify a tokenizer for caching: its name, sizes and ids of a probe text."""
    probe = tokenizer.encode(_PROBE_TEXT)
    return f"{tokenizer.name}|{tokenizer.vocab_size}|{tokenizer.eot_id}|{probe}"


def _cache_path(cache_dir: Path, source: str, raw: bytes, tokenizer: Tokenizer) -> Path:
    key = hashlib.sha256()
    for part in (_CACHE_VERSION, hashlib.sha256(raw).hexdigest(), _tokenizer_fingerprint(tokenizer)):
        key.update(part.encode("utf-8") + b"\0")
    stem = Path(source).name.split(".")[0] or "data"
    tok = "".join(c if c.isalnum() else "-" for c in tokenizer.name)
    return cache_dir / f"{stem}.{tok}.{key.hexdigest()[:16]}.pt"


def tokenize_bytes(raw: bytes, tokenizer: Tokenizer) -> torch.Tensor:
    """Tokenize UTF-8 text given as bytes into a 1-D int32 tensor.

    Byte tokenization is a zero-copy view of the bytes (then widened), so it is
    fast for any size; other tokenizers encode the decoded string.
    """
    if isinstance(tokenizer, ByteTokenizer):
        if not raw:
            return torch.empty(0, dtype=TOKEN_DTYPE)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(TOKEN_DTYPE)
    ids = tokenizer.encode(raw.decode("utf-8"))
    if ids and max(ids) > torch.iinfo(TOKEN_DTYPE).max:
        raise ValueError(f"token id {max(ids)} does not fit in {TOKEN_DTYPE}")
    return torch.tensor(ids, dtype=TOKEN_DTYPE)


def _tokenize_cached(source: str, raw: bytes, tokenizer: Tokenizer, cache_dir: str | None) -> torch.Tensor:
    """`tokenize_bytes`, memoised on disk in `cache_dir` (skipped for bytes)."""
    if cache_dir is None or isinstance(tokenizer, ByteTokenizer):
        return tokenize_bytes(raw, tokenizer)
    path = _cache_path(Path(cache_dir).expanduser(), source, raw, tokenizer)
    if path.is_file():
        return torch.load(path, weights_only=True)
    tokens = tokenize_bytes(raw, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a private temp file and rename: concurrent ranks never see a partial file.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(tokens, tmp)
    os.replace(tmp, path)
    return tokens


def _load_token_bin(path: Path) -> torch.Tensor:
    """A pre-tokenized file: raw little-endian uint16 ids, as in nanoGPT's `.bin` files."""
    nbytes = path.stat().st_size
    if nbytes % 2:
        raise ValueError(f"{path} has an odd size ({nbytes} bytes); expected uint16 token ids")
    if nbytes == 0:
        return torch.empty(0, dtype=TOKEN_DTYPE)
    tokens = torch.from_file(str(path), shared=False, size=nbytes // 2, dtype=torch.uint16)
    return tokens.to(TOKEN_DTYPE)


def load_tokens(name_or_path: str, tokenizer: Tokenizer, cache_dir: str | None = None) -> torch.Tensor:
    """The whole token stream of a dataset, as a 1-D int32 tensor.

    `name_or_path` is "shakespeare" (the embedded corpus), a UTF-8 text file
    (`.txt`, or any other name; `.xz` / `.gz` are decompressed) or a `.bin` file
    of uint16 token ids, which must already match `tokenizer`.
    """
    if name_or_path == SHAKESPEARE:
        path = CORPUS_PATH
    else:
        path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset file not found: {path} (expected '{SHAKESPEARE}', a UTF-8 text file "
            "such as .txt / .txt.xz / .txt.gz, or a .bin file of uint16 token ids)"
        )
    if path.suffix == ".bin":
        tokens = _load_token_bin(path)
        if tokens.numel() and int(tokens.max()) >= tokenizer.vocab_size:
            raise ValueError(
                f"{path} holds token id {int(tokens.max())}, outside the vocabulary of "
                f"tokenizer {tokenizer.name!r} (size {tokenizer.vocab_size})"
            )
        return tokens
    return _tokenize_cached(str(path), read_source_bytes(path), tokenizer, cache_dir)


def split_tokens(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a stream into (train, val): validation is the last `val_fraction` of it."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = int(len(tokens) * val_fraction)
    boundary = len(tokens) - num_val
    return tokens[:boundary], tokens[boundary:]


def load_token_splits(
    name_or_path: str,
    tokenizer: Tokenizer,
    val_fraction: float = 0.05,
    cache_dir: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset (see `load_tokens`) and split it into (train, val) streams.

    Both are 1-D int32 tensors (views of one stream; int32 halves the memory of
    int64); `GlobalBatchSampler` widens the windows it cuts to int64.  With a
    `cache_dir`, token ids of text sources are cached there, keyed by a hash of
    the source bytes and the tokenizer, so slow BPE tokenization runs once.
    """
    return split_tokens(load_tokens(name_or_path, tokenizer, cache_dir), val_fraction)


# ---------------------------------------------------------------------------
# Sampling batches
# ---------------------------------------------------------------------------


def _step_seed(seed: int, step: int) -> int:
    """A 64-bit generator seed that depends on (seed, step) only."""
    digest = hashlib.sha256(f"nanomt-batch:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class GlobalBatchSampler:
    """Random windows of a token stream, addressed by (step, dp rank, micro-batch).

    The global batch of step `t` is `global_batch_size` windows of
    `seq_len + 1` tokens whose start offsets come from a `torch.Generator`
    seeded with `(seed, t)`; inputs are a window's first `seq_len` tokens and
    targets its last `seq_len`.  Data-parallel rank `r` of `dp_size` owns rows
    `[r * G / dp_size, (r + 1) * G / dp_size)`, and its micro-batch `i` is rows
    `[i * micro_batch_size, (i + 1) * micro_batch_size)` of that slice.  So
    the union of all micro-batches of all ranks is the same global batch for
    every layout.  Only the `G` start offsets of a step are ever generated.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, global_batch_size: int, seed: int = 0) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
        if seq_len < 1 or global_batch_size < 1:
            raise ValueError("seq_len and global_batch_size must be positive")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"a stream of {len(tokens)} tokens is too short for windows of seq_len + 1 = {seq_len + 1}"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.next_step = 0  # one past the highest step served; saved for resume
        self._offsets = torch.arange(seq_len + 1)
        self._cached_step: tuple[int, torch.Tensor] | None = None

    # -- layout ------------------------------------------------------------

    def num_microbatches(self, dp_size: int, micro_batch_size: int) -> int:
        """Gradient-accumulation steps per optimizer step for this layout."""
        if dp_size < 1 or micro_batch_size < 1:
            raise ValueError("dp_size and micro_batch_size must be positive")
        rows_per_step = dp_size * micro_batch_size
        if self.global_batch_size % rows_per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by "
                f"dp_size * micro_batch_size = {dp_size} * {micro_batch_size}"
            )
        return self.global_batch_size // rows_per_step

    # -- training batches --------------------------------------------------

    def window_starts(self, step: int) -> torch.Tensor:
        """Start offsets of the `global_batch_size` windows of step `step`."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if self._cached_step is None or self._cached_step[0] != step:
            generator = torch.Generator().manual_seed(_step_seed(self.seed, step))
            high = len(self.tokens) - self.seq_len  # last valid start is len - seq_len - 1
            starts = torch.randint(0, high, (self.global_batch_size,), generator=generator)
            self._cached_step = (step, starts)
        return self._cached_step[1]

    def _windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.tokens[starts[:, None] + self._offsets].long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def micro_batch(
        self, step: int, micro_index: int, dp_rank: int, dp_size: int, micro_batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 `[micro_batch_size, seq_len]`, for one rank's micro-batch."""
        num_micro = self.num_microbatches(dp_size, micro_batch_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        if not 0 <= micro_index < num_micro:
            raise ValueError(f"micro_index {micro_index} out of range: {num_micro} micro-batches per step")
        first = dp_rank * (self.global_batch_size // dp_size) + micro_index * micro_batch_size
        starts = self.window_starts(step)[first : first + micro_batch_size]
        self.next_step = max(self.next_step, step + 1)
        return self._windows(starts)

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole global batch of a step, `[global_batch_size, seq_len]` (for tests and debugging)."""
        return self._windows(self.window_starts(step))

    # -- evaluation batches ------------------------------------------------

    def eval_batches(
        self, num_batches: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed evaluation batches: `num_batches * batch_size` windows evenly spread over the stream.

        They do not depend on the seed or the step, so losses are comparable
        across steps.  `batch_size` is global: each yielded (inputs, targets) is
        this rank's `batch_size / dp_size` rows, so averaging over ranks gives
        the same loss for any `dp_size`.
        """
        if batch_size % dp_size:
            raise ValueError(f"eval batch_size {batch_size} is not divisible by dp_size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        last_start = len(self.tokens) - self.seq_len - 1
        total = num_batches * batch_size
        all_starts = torch.arange(total) * last_start // max(total - 1, 1)  # exact integer spacing
        rows = batch_size // dp_size
        for batch in all_starts.view(num_batches, batch_size):
            yield self._windows(batch[dp_rank * rows : (dp_rank + 1) * rows])

    # -- checkpointing -----------------------------------------------------

    @property
    def consumed_samples(self) -> int:
        """Windows handed out so far: `next_step * global_batch_size`."""
        return self.next_step * self.global_batch_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "next_step": self.next_step,
            "consumed_samples": self.consumed_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the data stream of a checkpoint: same seed, same next step."""
        self.seed = int(state["seed"])
        self.next_step = int(state["next_step"])
        self._cached_step = None
