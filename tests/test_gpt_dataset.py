"""GPT sample streams over indexed files: epochs, cached indices, splits, blends, ramp-up."""

from __future__ import annotations

import numpy as np
import pytest

from nanomt.data.blend import BlendedDataset, blend_indices
from nanomt.data.gpt_dataset import GPTDataset, parse_split, split_ranges
from nanomt.data.indexed import IndexedDataset, IndexedWriter
from nanomt.data.rampup import BatchSchedule
from nanomt.optim.schedule import schedule_position
from nanomt.data.sampler import GlobalBatchSampler


def write_corpus(prefix, num_docs: int, seed: int = 0, first_id: int = 0) -> list[np.ndarray]:
    """Documents of 0..40 tokens whose ids are their global positions (+ first_id), so every
    token of the corpus is distinct and a sample says exactly where it came from."""
    lengths = np.random.default_rng(seed).integers(0, 41, num_docs)
    writer, docs, at = IndexedWriter(prefix, np.int32), [], first_id
    for n in lengths:
        docs.append(np.arange(at, at + n))
        at += n
    writer.add_documents(docs)
    writer.finish()
    return docs


@pytest.fixture
def corpus(tmp_path):
    docs = write_corpus(tmp_path / "c", 60)
    return IndexedDataset(tmp_path / "c"), docs


def test_one_epoch_covers_the_split_without_gaps_or_overlaps(corpus, tmp_path):
    ds, docs = corpus
    s = 7
    total = sum(map(len, docs))
    per_epoch = (total - 1) // s
    data = GPTDataset(ds, (0, 60), s, 3 * per_epoch, seed=5, cache_dir=tmp_path / "k")
    assert data.samples_per_epoch == per_epoch
    for epoch in range(3):
        samples = [data[i] for i in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
        assert all(len(x) == s + 1 for x in samples)
        # in stream order the samples of an epoch are shuffled; sorted by their first token
        # position within the epoch's document order they tile it, overlapping by one token
        order = [int(d) for d in data.doc_index[epoch * 60:(epoch + 1) * 60]]
        stream = np.concatenate([docs[d] for d in order])
        where = {int(t): k for k, t in enumerate(stream)}
        samples.sort(key=lambda x: where[int(x[0])])
        for j, x in enumerate(samples):
            assert np.array_equal(x, stream[j * s:j * s + s + 1])
        assert sorted(order) == list(range(60))
    orders = [tuple(data.doc_index[e * 60:(e + 1) * 60]) for e in range(3)]
    assert len(set(orders)) == 3  # each epoch shuffles the documents anew


def test_same_seed_same_stream_other_seed_differs_longer_stream_extends(corpus, tmp_path):
    ds, _ = corpus
    a = GPTDataset(ds, (0, 60), 5, 200, seed=1, cache_dir=tmp_path / "a")
    b = GPTDataset(ds, (0, 60), 5, 200, seed=1, cache_dir=tmp_path / "b")
    c = GPTDataset(ds, (0, 60), 5, 200, seed=2, cache_dir=tmp_path / "a")
    longer = GPTDataset(ds, (0, 60), 5, 900, seed=1, cache_dir=tmp_path / "a")
    stream = lambda d, n=200: np.stack([d[i] for i in range(n)])  # noqa: E731
    assert np.array_equal(stream(a), stream(b))
    assert not np.array_equal(stream(a), stream(c))
    assert np.array_equal(stream(longer), stream(a))
    with pytest.raises(IndexError):
        a[200]


def test_index_cache_reused_and_invalidated(tmp_path):
    write_corpus(tmp_path / "c", 50)
    first = GPTDataset(IndexedDataset(tmp_path / "c"), (0, 50), 6, 100, 0)
    assert first.cache.builds == 1 and first.cache.folder == tmp_path / "cache"
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4
    again = GPTDataset(IndexedDataset(tmp_path / "c"), (0, 50), 6, 100, 0)
    assert again.cache.builds == 0 and again.cache.base == first.cache.base
    assert isinstance(again.shuffle, np.memmap)  # mapped, not read
    write_corpus(tmp_path / "c", 50, seed=1)  # the corpus changed: its index hash changes
    changed = GPTDataset(IndexedDataset(tmp_path / "c"), (0, 50), 6, 100, 0)
    assert changed.cache.builds == 1 and changed.cache.base != first.cache.base
    other_len = GPTDataset(IndexedDataset(tmp_path / "c"), (0, 50), 8, 100, 0)
    assert other_len.cache.builds == 1


def _build_on_ranks(folder: str) -> dict:
    """On each rank: open the corpus's train indices in a shared cache (rank 0's build takes half
    a second longer), then a second index whose build fails on rank 0."""
    import time

    from nanomt.data import gpt_dataset
    from nanomt.parallel import comm

    built, rank, real = [], comm.world_rank(), gpt_dataset.build_sample_indices

    def slow_build(*args):
        built.append(rank)
        time.sleep(0.5)
        arrays = real(*args)
        times["built"] = time.time()
        return arrays
    times: dict = {}
    gpt_dataset.build_sample_indices = slow_build
    data = GPTDataset(IndexedDataset(f"{folder}/c"), (0, 50), 6, 100, 0, f"{folder}/k")
    times["ready"] = time.time()
    gpt_dataset.build_sample_indices = lambda *args: 1 / 0
    try:
        GPTDataset(IndexedDataset(f"{folder}/c"), (0, 50), 7, 100, 0, f"{folder}/k")
        failure = None
    except RuntimeError as error:
        failure = str(error)
    return {"rank": rank, "builds": data.cache.builds, "called": built, **times,
            "mapped": isinstance(data.shuffle, np.memmap), "failure": failure,
            "samples": np.stack([data[i] for i in range(100)])}


def test_indices_built_on_rank_zero_while_the_others_wait_and_map(tmp_path):
    from nanomt.testing import run_distributed

    write_corpus(tmp_path / "c", 50)
    results = run_distributed(_build_on_ranks, 2, args=(str(tmp_path),), timeout_s=120)
    assert [r["builds"] for r in results] == [1, 0]
    assert [r["called"] for r in results] == [[0], []]
    assert all(r["ready"] >= results[0]["built"] for r in results[1:])  # they waited
    assert all(r["mapped"] for r in results)
    reference = GPTDataset(IndexedDataset(tmp_path / "c"), (0, 50), 6, 100, 0, tmp_path / "ref")
    for r in results:
        assert np.array_equal(r["samples"], np.stack([reference[i] for i in range(100)]))
        assert r["failure"] == ("building data indices on rank 0 failed: ZeroDivisionError: "
                                "division by zero")


def _slow_work_on_rank_zero(fail: bool) -> str:
    import time

    from nanomt.data.cache import on_rank_zero

    def work() -> None:
        time.sleep(4.0)  # longer than the 1.5 s collective timeout of this run
        if fail:
            raise OSError("disk full")
    try:
        on_rank_zero(work, heartbeat_s=0.3)
    except RuntimeError as error:
        return str(error)
    return "ok"


def test_rank_zero_work_may_outlast_the_collective_timeout():
    """The waiting ranks hear from rank 0 every heartbeat, so a build longer than
    parallel.timeout_s (a big corpus's tokenization, a large blend) does not time them out;
    its failure still reaches every rank."""
    from nanomt.testing import run_distributed

    for fail, expected in ((False, "ok"),
                           (True, "building data indices on rank 0 failed: OSError: disk full")):
        results = run_distributed(_slow_work_on_rank_zero, 2, args=(fail,), timeout_s=60,
                                  collective_timeout_s=1.5)
        assert results == [expected, expected]


def test_splits_by_documents():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split([1, 1]) == [0.5, 0.5, 0.0]
    assert split_ranges(1000, parse_split("969,30,1")) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(10, [0.95, 0.05, 0.0]) == [(0, 10), (10, 10), (10, 10)]
    # 7/3 rounds to 2 each; the boundaries move by the shortfall of 1: [0, 3, 5, 7]
    assert split_ranges(7, [1 / 3, 1 / 3, 1 / 3]) == [(0, 3), (3, 5), (5, 7)]
    for bad in ("1,-1", "0,0", "1,2,3,4"):
        with pytest.raises(ValueError):
            parse_split(bad)


def test_split_samples_stay_in_their_documents(corpus, tmp_path):
    ds, docs = corpus
    valid = GPTDataset(ds, (50, 60), 4, 30, 0, tmp_path, split="valid")
    allowed = set(np.concatenate(docs[50:60]).tolist())
    assert all(set(valid[i].tolist()) <= allowed for i in range(30))


def reference_greedy(weights, n):
    w = np.asarray(weights, float) / sum(weights)
    counts = np.zeros(len(w))
    out = []
    for i in range(n):
        d = int(np.argmax(w * (i + 1) - counts))
        out.append(d)
        counts[d] += 1
    return out


def test_blend_shares_for_every_prefix():
    weights = [0.19336, 0.15652, 0.14336, 0.13017, 0.09446, 0.08962, 0.05689, 0.04771,
               0.02897, 0.01588, 0.01359, 0.01007, 0.00873, 0.00859, 0.00208]  # MT-NLG
    n = 10_000
    source, within = blend_indices(weights, n)
    assert source[:2000].tolist() == reference_greedy(weights, 2000)
    w = np.array(weights) / sum(weights)
    counts = np.zeros((n, len(w)))
    counts[np.arange(n), source] = 1
    counts = counts.cumsum(axis=0)  # samples of each source in every prefix
    targets = np.arange(1, n + 1)[:, None] * w
    assert np.abs(counts - targets).max() < 1.0  # within one sample, every prefix
    assert np.abs(counts[-1] / n - w).max() < 0.01 * w.max()
    for d in range(len(w)):  # each source's samples are taken in order 0, 1, 2, ...
        assert within[source == d].tolist() == list(range(int(counts[-1, d])))
    assert blend_indices([2, 0, 2], 4)[0].tolist() == [0, 2, 0, 2]


def test_blended_dataset_reads_its_sources(tmp_path):
    write_corpus(tmp_path / "a", 40, seed=1)
    write_corpus(tmp_path / "b", 40, seed=2, first_id=10**6)
    srcs = [IndexedDataset(tmp_path / "a"), IndexedDataset(tmp_path / "b")]
    made = {}

    def make(d, n):
        made[d] = n
        return GPTDataset(srcs[d], (0, 40), 4, n, 0, tmp_path / "k")
    blend = BlendedDataset([3, 1], 400, make, tmp_path / "k")
    assert made == {0: 300, 1: 100}
    from_b = [bool(blend[i][0] >= 10**6) for i in range(400)]
    assert sum(from_b) == 100 and from_b[:8] == [False, False, True, False] * 2  # ties: lower index
    again = BlendedDataset([3, 1], 400, make, tmp_path / "k")
    assert again.cache.builds == 0


def test_rampup_table():
    # [START 4, INCREMENT 4, RAMP 60 samples] up to 16: 3 increments, one per 20 samples.
    s = BatchSchedule(16, [4, 4, 60])
    # consumed before the step -> B: 0->4, 4->4, 8->4, 12->4, 16->4, 20->8, 28->8, 36->8,
    # 44->12, 56->12, 68->16 (past 60), then 16 a step
    table = [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4), (5, 8), (6, 8), (7, 8), (8, 12), (9, 12),
             (10, 16), (11, 16)]
    assert [(t, s.batch_size(t)) for t in range(12)] == table
    assert [s.consumed_before(t) for t in range(12)] == [0, 4, 8, 12, 16, 20, 28, 36, 44, 56,
                                                         68, 84]
    assert s.ramp_steps == 10 and s.sizes() == [4, 8, 12, 16]
    assert [s.batch_size_at(c) for c in (0, 19, 20, 39, 40, 59, 60, 61)] == \
        [4, 4, 8, 8, 12, 12, 16, 16]
    mtnlg = BatchSchedule(1920, [32, 32, 5_859_375])
    assert mtnlg.batch_size(0) == 32 and mtnlg.sizes()[-1] == 1920
    assert mtnlg.batch_size_at(5_859_375 + 1) == 1920
    # 5,859,375 / 59 = 99,311.4 samples per increment
    assert (mtnlg.batch_size_at(99_311), mtnlg.batch_size_at(99_312)) == (32, 64)
    assert BatchSchedule(8, [8, 8, 100]).ramp_steps == 0
    for bad in ([4, 5, 60], [0, 4, 60], [32, 4, 60]):
        with pytest.raises(ValueError):
            BatchSchedule(16, bad)


def test_schedule_units():
    s = BatchSchedule(16, [4, 4, 60])
    assert schedule_position("steps", s.consumed_before, 128)(7) == 7
    assert schedule_position("samples", s.consumed_before, 128)(7) == 36
    assert schedule_position("tokens", s.consumed_before, 128)(7) == 36 * 128


def test_ramped_sampler_resumes_mid_ramp_under_other_layouts(corpus, tmp_path):
    ds, _ = corpus
    data = GPTDataset(ds, (0, 60), 4, 200, 3, tmp_path)
    ref = GlobalBatchSampler(data, BatchSchedule(16, [4, 4, 60]))
    full = [ref.global_batch(t)[0] for t in range(9)]
    run = GlobalBatchSampler(data, BatchSchedule(16, [4, 4, 60]))
    for t in range(6):
        run.micro_batch(t, 0, 0, 1, run.batch_size(t))
    state = run.state_dict()
    assert state["consumed_samples"] == 28 and state["next_step"] == 6
    resumed = GlobalBatchSampler(data, BatchSchedule(16, [4, 4, 60]))
    resumed.load_state_dict(state)
    for t in range(6, 9):  # dp=2, micro-batch 2: the same rows as the single-process run
        m = resumed.num_microbatches(2, 2, t)
        rows = [resumed.micro_batch(t, i, r, 2, 2)[0] for r in range(2) for i in range(m)]
        assert np.array_equal(np.concatenate(rows), full[t].numpy())
