"""Checkpoints: bit-exact resume, resharding to other layouts, atomic saves under crashes,
SIGTERM, keep_last and clear errors for broken inputs (none of which touch a good checkpoint)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanomt.checkpoint import CheckpointError, CheckpointReader, load_checkpoint
from nanomt.checkpoint.format import Piece, assemble, cut, make_piece
from nanomt.model import GPT, ModelConfig
from nanomt.testing import compose_config, run_distributed
from nanomt.train import run

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_len=32",
         "train.global_batch_size=8", "train.micro_batch_size=2", "train.progress_bar=false",
         "train.eval_interval=0", "optim.warmup_steps=2", "train.device=cpu"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- format pieces ----------------------------------------------------------------------------
def test_pieces_strip_vocab_padding_and_reassemble():
    full = torch.arange(10 * 4, dtype=torch.float32).view(10, 4)  # 10 real rows
    padded = torch.cat([full, torch.zeros(2, 4)])  # 12 rows: padding for tp=3
    pieces = []
    for rank in range(3):  # row shards [0,4) [4,8) [8,12): the last is half padding
        box = [[4 * rank, 4 * rank + 4], [0, 4]]
        made = make_piece("model/word_embedding.weight", "word_embedding.weight",
                          padded[4 * rank: 4 * rank + 4], [10, 4], box)
        pieces.append(made)
    assert pieces[2][0].box == [[8, 10], [0, 4]]
    assert torch.equal(assemble(pieces), full)
    # ZeRO-style flat ranges of a tp shard: [0, 6) and [6, 16) of the last shard's 16 elements
    flat_pieces = [make_piece("k", "word_embedding.weight", padded[8:12].reshape(-1)[a:b],
                              [10, 4], [[8, 12], [0, 4]], [a, b]) for a, b in ((0, 6), (6, 16))]
    assert flat_pieces[1][0].flat == [6, 8]  # clipped at the last real row
    whole = pieces[:2] + flat_pieces
    assert torch.equal(assemble(whole), full)
    # cut for another layout: tp=2 with 12 padded rows -> rows [6, 12), padding zero
    assert torch.equal(cut(full, [12, 4], [[6, 12], [0, 4]]), padded[6:12])
    with pytest.raises(CheckpointError, match="cover"):
        assemble(pieces[:2])
    assert isinstance(pieces[0][0], Piece)


# ---- bit-exact resume -------------------------------------------------------------------------
def test_exit_after_and_resume_is_bit_exact(tmp_path):
    # dropout on: the resumed run must also restore every RNG stream to match bit for bit
    overrides = SMALL + ["train.steps=20", "model.dropout=0.1", "optim.decay_steps=20"]
    run(compose_config(overrides), tmp_path / "whole")
    first = run(compose_config(overrides + ["train.exit_after=10"]), tmp_path / "split")
    assert first["steps"] == 10
    pointer = tmp_path / "split" / "checkpoints" / "latest"
    assert pointer.read_text().strip() == "step_00000010"
    run(compose_config(overrides + ["train.resume=auto"]), tmp_path / "split")
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert len(whole) == len(split) == 20
    assert whole == split  # every loss bit for bit
