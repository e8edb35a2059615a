"""Training on the indexed path with a batch-size ramp-up: metrics, resume, layouts, data reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nanomt.testing import compose_config, run_distributed
from nanomt.train import run

# 4 layers so that pp=4 has two middle stages; ramp [4, 4, 24] up to 16 (hand table below)
RAMP = ["model.num_layers=4", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=32",
        "train.global_batch_size=16", "train.micro_batch_size=1",
        "train.rampup_batch_size=[4,4,24]", "train.steps=6", "train.eval_interval=0",
        "train.eval_batches=1", "optim.warmup_steps=2", "optim.schedule_unit=samples",
        "optim.decay_steps=60", "train.progress_bar=false", "logging.wandb.mode=disabled"]
# consumed before the step 0, 4, 8, 16, 28, 44 -> B = 4, 4 (4 / 8 samples per increment
# rounds down), 8, 12, 16 (28 > 24), 16
SIZES = [4, 4, 8, 12, 16, 16]
CONSUMED = [4, 8, 16, 28, 44, 60]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("single")
    run(compose_config(RAMP), run_dir)
    return metrics(run_dir)


def test_ramped_run_logs_batch_sizes_and_consumed_samples(single):
    assert [m["global_batch_size"] for m in single] == SIZES
    assert [m["consumed_samples"] for m in single] == CONSUMED
    assert [m["tokens"] for m in single] == [c * 32 for c in CONSUMED]
    # lr counted in samples (optim.schedule_unit): step t stands at the samples consumed before
    # it, 0, 4, 8, 16, 28, 44: warm-up over 2 samples, then cosine from 1e-3 to 1e-4 over 60
    def lr_at_sample(c: int) -> float:
        if c < 2:
            return 1e-3 * c / 2  # 0-based: lr 0 at the first step (optim/schedule.py)
        return 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (c - 2) / 58))
    before = [0] + CONSUMED[:-1]
    assert [m["lr"] for m in single] == pytest.approx([lr_at_sample(c) for c in before],
                                                      rel=1e-6)


def test_resume_mid_ramp_is_bit_exact_and_other_micro_batch_continues_the_stream(
        single, tmp_path):
    split = tmp_path / "split"
    run(compose_config(RAMP + ["train.exit_after=3", "checkpoint.interval=0"]), split)
    run(compose_config(RAMP + ["train.resume=auto"]), split)
    assert [m["loss"] for m in metrics(split)] == [m["loss"] for m in single]
    other = tmp_path / "other"
    run(compose_config(RAMP + ["train.exit_after=3", "checkpoint.interval=0"]), other)
    run(compose_config(RAMP + ["train.resume=auto", "train.micro_batch_size=2"]), other)
    resumed = metrics(other)
    assert [m["consumed_samples"] for m in resumed] == CONSUMED
    for got, want in zip(resumed, single):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def _layouts_with_reads(base: str) -> dict:
    """On 4 ranks: the ramped run under dp=2 x pp=2, then under pp=4 counting each rank's
    micro-batch reads."""
    from nanomt.data.sampler import GlobalBatchSampler
    from nanomt.parallel import comm

    reads = {"n": 0}
    original = GlobalBatchSampler.micro_batch

    def counting(self, *args, **kwargs):
        reads["n"] += 1
        return original(self, *args, **kwargs)
    GlobalBatchSampler.micro_batch = counting
    base_dir = Path(base)
    run(compose_config(RAMP + ["parallel.pp=2", "parallel.dp=2"]), base_dir / "dp2pp2")
    reads["n"] = 0
    run(compose_config(RAMP + ["parallel.pp=4"]), base_dir / "pp4")
    return {"rank": comm.world_rank(), "reads": reads["n"]}


def test_ramped_layouts_match_single_process_and_only_end_stages_read(single, tmp_path):
    results = run_distributed(_layouts_with_reads, 4, args=(str(tmp_path),), timeout_s=400)
    for name in ("dp2pp2", "pp4"):
        got = metrics(tmp_path / name)
        assert [m["global_batch_size"] for m in got] == SIZES
        for g, want in zip(got, single):
            assert g["loss"] == pytest.approx(want["loss"], rel=1e-5)
    ranks = json.loads((tmp_path / "pp4" / "run.json").read_text())["ranks"]
    stage = {r["rank"]: r["pp"] for r in ranks}
    reads = {stage[r["rank"]]: r["reads"] for r in results}
    micro_batches = sum(SIZES)  # micro_batch_size 1, dp 1: one micro-batch per sample
    assert reads == {0: micro_batches, 1: 0, 2: 0, 3: micro_batches}


def write_byte_corpus(prefix: Path, num_docs: int, low: int, seed: int) -> None:
    """Byte-tokenizer documents (uint16 ids) whose ids all lie in [low, low + 128)."""
    import numpy as np

    from nanomt.data.indexed import IndexedWriter

    rng = np.random.default_rng(seed)
    writer = IndexedWriter(prefix, np.uint16)
    writer.add_documents([rng.integers(low, low + 128, n) for n in rng.integers(20, 200,
                                                                                 num_docs)])
    writer.finish()


def test_training_reads_an_indexed_prefix_and_a_blend(tmp_path):
    """data.path=PREFIX is the train split's GPTDataset; data.blend=[3, A, 1, B] draws B's
    samples one in four (ids of A below 128, of B above); a run trains on the blend."""
    import numpy as np

    from nanomt.data.build import build_samplers
    from nanomt.data.gpt_dataset import GPTDataset, parse_split, split_ranges
    from nanomt.data.indexed import IndexedDataset

    write_byte_corpus(tmp_path / "a", 200, 0, seed=1)
    write_byte_corpus(tmp_path / "b", 200, 128, seed=2)
    base = RAMP[:5] + ["train.micro_batch_size=4", "train.steps=3", "train.eval_interval=0",
                       "train.eval_batches=1", "train.progress_bar=false",
                       "logging.wandb.mode=disabled", "data.split='90,10,0'",
                       f"data.cache_dir={tmp_path / 'cache'}"]
    train, valid = build_samplers(compose_config(base + [f"data.path={tmp_path / 'a'}"]), 32)
    a = IndexedDataset(tmp_path / "a")
    train_docs, valid_docs = split_ranges(a.num_documents, parse_split("90,10,0"))[:2]
    for sampler, docs, n in ((train, train_docs, 48), (valid, valid_docs, 16)):
        want = GPTDataset(a, docs, 32, n, 1234, tmp_path / "ref")  # train.seed
        assert len(sampler.stream) == n
        assert all(np.array_equal(sampler.stream[i], want[i]) for i in range(n))
    blend = base + [f"data.blend=[3,{tmp_path / 'a'},1,{tmp_path / 'b'}]"]
    train, _ = build_samplers(compose_config(blend), 32)
    from_b = [bool(train.stream[i].min() >= 128) for i in range(48)]
    assert all(train.stream[i].max() < 128 for i in range(48) if not from_b[i])
    assert from_b[:4] == [False, False, True, False] and sum(from_b) == 12
    got = metrics(_run(blend, tmp_path / "run"))
    assert [m["consumed_samples"] for m in got] == [16, 32, 48]
    assert all(math.isfinite(m["loss"]) for m in got)


def _run(overrides: list[str], run_dir: Path) -> Path:
    run(compose_config(overrides), run_dir)
    return run_dir
