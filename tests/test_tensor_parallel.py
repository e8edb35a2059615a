"""Tensor and sequence parallelism against the single-process model (gloo, CPU, fp32).

One spawn of four ranks carries every check (process start dominates on this machine):
`_layer_checks`: for gpt and llama, tp in {2, 4} (tp=2 runs as tp 2 x dp 2), with and without
sequence parallelism: shards, logits, loss, every gradient, collectives counted per layer; the
vocab-parallel cross-entropy with and without padded vocabulary, and the largest tensor it
creates; dropout streams inside and outside the tensor-parallel regions. The tests below only
assert on what the ranks sent back. Whole training runs: test_tensor_parallel_training.py.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nanomt.model import GPT, ModelConfig
from nanomt.parallel import comm
from nanomt.parallel.cross_entropy import vocab_parallel_cross_entropy
from nanomt.parallel.data_parallel import GradientBuffer, finalize_grads
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.param_info import param_info
from nanomt.parallel.random import seed_everything
from nanomt.testing import run_distributed
from comm_counting import count_collectives
from model_outputs import full_logits

WORLD = 4
# hidden 48 keeps every activation and weight smaller than one full-vocabulary logits tensor
# [b, s, V_padded] = 4*16*256, so "the largest tensor a rank creates" can tell them apart.
# vocab 250 padded to a multiple of 8 -> 256: six padding columns, all on the last tp rank.
TINY = dict(num_layers=2, hidden_size=48, num_heads=4, seq_len=16, vocab_size=250,
            vocab_pad_multiple=8)
BATCH, SEQ, PADDED_VOCAB = 4, 16, 256
SEED = 7
LAYOUTS = [(style, tp, sp) for style in ("gpt", "llama") for tp in (2, 4) for sp in (False, True)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def split(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's slice of `tensor` along `dim` (no communication)."""
    rank, world = comm.rank_and_size(group)
    return tensor.chunk(world, dim=dim)[rank].contiguous()


def gathered(tensor: torch.Tensor, dim: int | None, group) -> torch.Tensor:
    """The full tensor from its tp shards (dim None: already full)."""
    return tensor if dim is None else comm.all_gather(tensor.contiguous(), group, dim)


def batch(vocab_size: int = TINY["vocab_size"]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


class LargestTensor(TorchDispatchMode):
    """Sees every tensor any aten or c10d op creates (forward, backward, collectives, inside
    custom autograd functions) and remembers the largest numel: a rank that ever materialised a
    full-vocabulary logits tensor, even as a temporary, would show it here."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


class InitDraws(TorchDispatchMode):
    """Counts the random numbers drawn (aten normal_) and the largest tensor created."""

    def __init__(self):
        super().__init__()
        self.drawn, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.normal_.default:
            self.drawn += args[0].numel()
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def _init_draws(cfg: ModelConfig, grid: ParallelGrid | None) -> dict:
    """What building the model draws, and the local size of each weight split over tp."""
    draws = InitDraws()
    with draws:
        model = GPT(cfg, grid, seed=SEED)
    split = {name: p.numel() for name, p in model.named_parameters()  # biases start at zero
             if param_info(p).tp_split_dim is not None and name.endswith("weight")}
    return {"drawn": draws.drawn, "largest": draws.largest,
            "local_numel": model.num_local_parameters(), "split_local": split}


# ---- rank side: model equivalence and collectives ---------------------------------------------
def _count(log: list[tuple[str, int]]) -> dict:
    return dict(Counter(log))


def _layer_collectives(layer, grid, sp: bool) -> tuple[dict, dict]:
    """Collectives of one transformer layer, forward and backward."""
    tp = grid.tp_size
    x = torch.randn(BATCH, SEQ // tp if sp else SEQ, TINY["hidden_size"], requires_grad=True)
    with count_collectives() as fwd:
        y = layer(x)
    with count_collectives() as bwd:
        y.backward(torch.ones_like(y))
    return _count(fwd), _count(bwd)


def final_grad(buffer: GradientBuffer, param: torch.nn.Parameter) -> torch.Tensor:
    """`param`'s gradient as the optimizer will see it (ZeRO-0: the whole flat bucket)."""
    offset = buffer.offset_of[id(param)]
    return buffer.bucket_of[id(param)].grad_buffer[offset: offset + param.numel()].view_as(param)


def unpadded_shape(cfg: ModelConfig, name: str, param: torch.Tensor) -> list[int]:
    shape = list(param.shape)
    if name in ("word_embedding.weight", "output_layer.weight"):
        shape[0] = cfg.vocab_size
    return shape


def _compare_model(cfg: ModelConfig, grid: ParallelGrid, sp: bool, ref: dict) -> dict:
    inputs, targets = batch()
    model = GPT(cfg, grid, seed=SEED, sequence_parallel=sp)
    shard_errors = {}
    ref_params = dict(ref["model"].named_parameters())
    for name, p in model.named_parameters():
        shard_errors[name] = rel_err(gathered(p.data, param_info(p).tp_split_dim, grid.tp_group),
                                     ref_params[name].data)
    split_dims = {name: param_info(p).tp_split_dim for name, p in model.named_parameters()}
    # Each record's global shape is the single-process tensor's (vocabulary rows unpadded).
    wrong_global_shapes = [name for name, p in model.named_parameters()
                           if list(param_info(p).global_shape) != unpadded_shape(cfg, name,
                                                                               ref_params[name])]
    layer_fwd, layer_bwd = _layer_collectives(model.layers[0], grid, sp)

    # Gradients go where training puts them: the data-parallel buffer (every dp rank sees the
    # same batch here, so the dp average changes nothing), completed by finalize_grads, which
    # also sums the sequence-parallel partial gradients over tp.
    buffer = GradientBuffer([model], grid, zero_stage=0, num_microbatches=1)
    largest = LargestTensor()
    with largest:
        with count_collectives() as fwd:
            loss = model(inputs, targets)
        with count_collectives() as bwd:
            loss.backward()
    with count_collectives() as sp_reduce:
        finalize_grads(buffer)
    grad_errors = {}
    for name, p in model.named_parameters():
        grad_errors[name] = rel_err(gathered(final_grad(buffer, p), param_info(p).tp_split_dim,
                                             grid.tp_group), ref_params[name].grad)
    return {"loss": loss.item(), "loss_err": rel_err(loss.detach(), ref["loss"]),
            "logits_err": rel_err(full_logits(model, inputs), ref["logits"]),
            "shard_errors": shard_errors, "grad_errors": grad_errors, "split_dims": split_dims,
            "wrong_global_shapes": wrong_global_shapes,
            "fwd": _count(fwd), "bwd": _count(bwd), "sp_reduce": _count(sp_reduce),
            # the data-parallel side: each bucket all-reduced over dp once, during backward
            "dp_bucket_numels": [b.padded_numel for b in buffer.buckets] if buffer.dp > 1 else [],
            "layer_fwd": layer_fwd, "layer_bwd": layer_bwd, "largest": largest.largest}


def _reference(cfg: ModelConfig) -> dict:
    """The single-process model, its loss, logits and gradients (in .grad)."""
    inputs, targets = batch()
    model = GPT(cfg, None, seed=SEED)
    largest = LargestTensor()
    with largest:
        loss = model(inputs, targets)
        loss.backward()
    return {"model": model, "loss": loss.detach(), "logits": full_logits(model, inputs),
            "largest": largest.largest}


def _cross_entropy_checks(grid: ParallelGrid) -> dict:
    """vocab_parallel_cross_entropy vs F.cross_entropy on the full logits, padded or not."""
    results = {}
    generator = torch.Generator().manual_seed(1)
    for vocab in (250, 256):
        full = 3 * torch.randn(BATCH, SEQ, PADDED_VOCAB, generator=generator)
        full[..., vocab:] = 50.0  # padding with huge logits: must take no probability mass
        targets = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
        upstream = torch.rand(BATCH, SEQ, generator=generator)  # a non-uniform d loss

        ref_logits = full.clone().requires_grad_()
        ref_loss = F.cross_entropy(ref_logits[..., :vocab].reshape(-1, vocab),
                                   targets.reshape(-1), reduction="none").view(BATCH, SEQ)
        (ref_loss * upstream).sum().backward()

        shard = split(full, grid.tp_group, dim=-1).clone().requires_grad_()
        largest = LargestTensor()
        with largest:
            loss = vocab_parallel_cross_entropy(shard, targets, grid.tp_group, vocab)
            (loss * upstream).sum().backward()
        results[vocab] = {
            "loss_err": rel_err(loss.detach(), ref_loss.detach()),
            "grad_err": rel_err(gathered(shard.grad, -1, grid.tp_group), ref_logits.grad),
            "padding_grad": float(gathered(shard.grad, -1, grid.tp_group)[..., vocab:].abs()
                                  .sum()) if vocab < PADDED_VOCAB else 0.0,
            "largest": largest.largest, "shard_numel": shard.numel()}
    return results


def _dropout_checks(grid: ParallelGrid) -> dict:
    """Dropout masks inside the tp regions (per rank) and outside them (shared)."""
    cfg = ModelConfig(**{**TINY, "dropout": 0.5})
    results = {}
    for sp in (False, True):
        model = GPT(cfg, grid, seed=SEED, sequence_parallel=sp).train()
        seed_everything(11)  # the default stream, identical on every rank
        layer = model.layers[0]
        generator = torch.Generator().manual_seed(2)
        q, k, v = (torch.randn(BATCH, 1, SEQ, cfg.head_dim, generator=generator)
                   for _ in range(3))  # the same inputs on every rank
        without_dropout = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attention = layer.attention.core_attention(q, k, v)
        local_seq = SEQ // grid.tp_size if sp else SEQ
        residual_mask = layer.residual_dropout(torch.ones(BATCH, local_seq, cfg.hidden_size)) == 0
        inputs, _ = batch()
        embedding_mask = model.embed(inputs) == 0
        results[sp] = {"attention": attention, "attention_dropped": rel_err(attention,
                                                                           without_dropout),
                       "residual_mask": residual_mask, "embedding_mask": embedding_mask,
                       "default_stream_after": torch.rand(8)}
    return results


def _layer_checks() -> dict:
    torch.manual_seed(0)
    grids = {tp: ParallelGrid(tp=tp, dp=WORLD // tp) for tp in (2, 4)}
    results = {"tp_rank": {tp: grid.tp_rank for tp, grid in grids.items()}}
    for style in ("gpt", "llama"):
        cfg = ModelConfig(**{**TINY, "style": style})
        ref = _reference(cfg)
        results[(style, "reference_largest")] = ref["largest"]
        results[(style, "init_draws")] = {1: _init_draws(cfg, None), 4: _init_draws(cfg, grids[4])}
        for tp, grid in grids.items():
            for sp in (False, True):
                results[(style, tp, sp)] = _compare_model(cfg, grid, sp, ref)
    results["cross_entropy"] = {tp: _cross_entropy_checks(grid) for tp, grid in grids.items()}
    results["dropout"] = _dropout_checks(grids[4])
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_layer_checks, world_size=WORLD, timeout_s=400)


# ---- equivalence with the single-process model -------------------------------------------------
@pytest.mark.parametrize("style,tp,sp", LAYOUTS)
def test_shards_logits_loss_and_grads_match_single_process(ranks, style, tp, sp):
    for rank in ranks:
        r = rank[(style, tp, sp)]
        assert max(r["shard_errors"].values()) == 0.0  # init holds exact shards of tp=1
        assert r["loss_err"] < 1e-5 and r["logits_err"] < 1e-5, (r["loss_err"], r["logits_err"])
        worst = max(r["grad_errors"], key=r["grad_errors"].get)
        assert r["grad_errors"][worst] < 1e-5, (worst, r["grad_errors"][worst])
        dims = r["split_dims"]
        assert dims["layers.0.attention.qkv.weight"] == 0  # column-parallel: by output rows
        assert dims["layers.0.attention.proj.weight"] == 1  # row-parallel: by input columns
        assert dims["word_embedding.weight"] == 0  # vocab-parallel
        assert dims["layers.0.norm1.weight"] is None  # replicated
        assert r["wrong_global_shapes"] == []


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_init_draws_only_this_ranks_shard(ranks, style):
    """Blockwise init: a tp=4 rank draws its shard of each split weight (a quarter of it) and
    nothing more, and never creates a tensor the size of a full split weight."""
    whole = ranks[0][(style, "init_draws")][1]
    per_rank = [rank[(style, "init_draws")][4] for rank in ranks]
    cfg = ModelConfig(**{**TINY, "style": style})
    h, padding_rows = cfg.hidden_size, PADDED_VOCAB - cfg.vocab_size
    tables = 1 if cfg.tie_embeddings else 2
    split_full = sum(per_rank[0]["split_local"].values()) * 4  # split weights, whole model
    replicated_drawn = whole["drawn"] - (split_full - tables * padding_rows * h)
    assert replicated_drawn >= 0
    # Every element of a split weight is drawn by exactly one of the four ranks...
    assert sum(r["drawn"] for r in per_rank) == whole["drawn"] + 3 * replicated_drawn
    for tp_rank, r in zip([rank["tp_rank"][4] for rank in ranks], per_rank):
        padding_here = tables * padding_rows * h if tp_rank == 3 else 0  # zeros, not drawn
        # ...which is this rank's quarter: what it holds of them, less its padding rows.
        assert r["drawn"] == replicated_drawn + sum(r["split_local"].values()) - padding_here
        assert sum(r["split_local"].values()) * 4 == split_full
        # No full split weight (or anything as large) ever exists on the rank.
        assert r["largest"] <= max(r["split_local"].values())
    assert whole["largest"] >= 4 * max(per_rank[0]["split_local"].values())  # the check sees


# ---- collectives: the paper's count and volume ---------------------------------------------------
def ring_volume(counts: dict, tp: int) -> float:
    """Elements each rank sends in a ring: all-reduce 2(t-1)/t n, all-gather, reduce-scatter
    (t-1)/t n (n the full tensor), so all-reduce = reduce-scatter + all-gather."""
    factor = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1}
    return sum(factor[kind] * (tp - 1) / tp * numel * n for (kind, numel), n in counts.items())


@pytest.mark.parametrize("style,tp,sp", LAYOUTS)
def test_collectives_per_layer_match_theory(ranks, style, tp, sp):
    bsh = BATCH * SEQ * TINY["hidden_size"]
    r = ranks[0][(style, tp, sp)]
    if sp:  # g-bar / f-bar: all-gather before each column-parallel linear, reduce-scatter after
        expected_fwd = {("all_gather", bsh): 2, ("reduce_scatter", bsh): 2}
        # Backward mirrors them (reduce-scatter of the input gradient, all-gather of the output
        # gradient), and each column-parallel linear gathers its saved sequence shard again.
        expected_bwd = {("all_gather", bsh): 2 + 2, ("reduce_scatter", bsh): 2}
    else:  # f / g: 2 all-reduces forward (g after attention and MLP), 2 backward (f)
        expected_fwd = expected_bwd = {("all_reduce", bsh): 2}
    assert r["layer_fwd"] == expected_fwd and r["layer_bwd"] == expected_bwd
    # f/g and f-bar/g-bar move the same bytes: Korthikanti et al. 2022, sec. 4.2.2, 8 b s h (t-1)/t
    # per layer; saving only the sequence shard costs SP one more all-gather (2 b s h (t-1)/t).
    per_layer = ring_volume(r["layer_fwd"], tp) + ring_volume(r["layer_bwd"], tp)
    assert per_layer == pytest.approx((10 if sp else 8) * bsh * (tp - 1) / tp)


@pytest.mark.parametrize("style,tp,sp", LAYOUTS)
def test_collectives_of_the_whole_model(ranks, style, tp, sp):
    """Layers as above, plus the embedding (g, or reduce-scatter under SP), the head (f, or
    all-gather under SP, gathered again in backward) and the cross-entropy's two small
    all-reduces (max; target logit and sum of exponentials, stacked): b*s and 2*b*s elements,
    never the logits."""
    bsh, bs, layers = BATCH * SEQ * TINY["hidden_size"], BATCH * SEQ, TINY["num_layers"]
    r = ranks[0][(style, tp, sp)]
    loss_collectives = Counter({("all_reduce", bs): 1, ("all_reduce", 2 * bs): 1})
    layer_fwd, layer_bwd = Counter(r["layer_fwd"]), Counter(r["layer_bwd"])
    layers_fwd = Counter({key: layers * n for key, n in layer_fwd.items()})
    layers_bwd = Counter({key: layers * n for key, n in layer_bwd.items()})
    if sp:
        embedding_fwd, head_fwd = {("reduce_scatter", bsh): 1}, {("all_gather", bsh): 1}
        head_bwd = {("reduce_scatter", bsh): 1, ("all_gather", bsh): 1}
        embedding_bwd = {("all_gather", bsh): 1}
    else:
        embedding_fwd, head_fwd, head_bwd, embedding_bwd = {("all_reduce", bsh): 1}, {}, \
            {("all_reduce", bsh): 1}, {}
    assert Counter(r["fwd"]) == layers_fwd + Counter(embedding_fwd) + Counter(head_fwd) \
        + loss_collectives
    dp_reductions = Counter(("all_reduce", n) for n in r["dp_bucket_numels"])
    assert Counter(r["bwd"]) == layers_bwd + Counter(head_bwd) + Counter(embedding_bwd) \
        + dp_reductions
    # SP's extra step: one all-reduce of the flattened norm/bias/position grads.
    assert len(r["sp_reduce"]) == (1 if sp else 0)


# ---- vocab-parallel cross-entropy -------------------------------------------------------------
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("vocab", [250, 256])
def test_vocab_parallel_cross_entropy_matches_torch(ranks, tp, vocab):
    for rank in ranks:
        r = rank["cross_entropy"][tp][vocab]
        assert r["loss_err"] < 1e-6 and r["grad_err"] < 1e-6, r
        assert r["padding_grad"] == 0.0
        # Nothing bigger than this rank's logits shard [b, s, V_padded / t] is ever created.
        assert r["largest"] == r["shard_numel"] == BATCH * SEQ * PADDED_VOCAB // tp


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_no_rank_materialises_full_vocab_logits(ranks, style):
    logits_numel = BATCH * SEQ * PADDED_VOCAB
    # The monitor is honest: the single-process model does create [b, s, V] tensors...
    assert ranks[0][(style, "reference_largest")] >= logits_numel
    # ...and at tp=4 no forward or backward tensor reaches that size on any rank.
    for rank in ranks:
        for sp in (False, True):
            assert rank[(style, 4, sp)]["largest"] < logits_numel


# ---- dropout streams --------------------------------------------------------------------------
def test_dropout_differs_inside_tp_regions_and_agrees_outside(ranks):
    tp_ranks = [r["tp_rank"][4] for r in ranks]
    assert tp_ranks == [0, 1, 2, 3]
    for sp in (False, True):
        per_rank = [r["dropout"][sp] for r in ranks]
        assert per_rank[0]["attention_dropped"] > 0.1  # dropout did act
        # Attention-probability dropout: each rank's heads get their own mask.
        for a in range(WORLD):
            for b in range(a + 1, WORLD):
                assert not torch.equal(per_rank[a]["attention"], per_rank[b]["attention"])
        for key in ("residual_mask", "embedding_mask"):
            masks = [r[key] for r in per_rank]
            if sp:  # each rank drops on its own sequence shard: independent masks
                assert all(not torch.equal(masks[0], m) for m in masks[1:]), key
            else:  # the replicated hidden state: the same mask on every rank
                assert all(torch.equal(masks[0], m) for m in masks[1:]), key
        # Forking the tp stream never advanced the shared default stream.
        assert all(torch.equal(per_rank[0]["default_stream_after"], r["default_stream_after"])
                   for r in per_rank)


def test_cross_entropy_rejects_targets_outside_the_vocabulary():
    logits = torch.randn(2, 3, 8)
    for bad in (-100, 8):
        targets = torch.zeros(2, 3, dtype=torch.long)
        targets[1, 2] = bad
        with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 8\)"):
            vocab_parallel_cross_entropy(logits, targets, None, 8)


def test_no_rng_fork_without_dropout(monkeypatch):
    """With dropout 0 the layers never swap RNG states in (a CPU+GPU state copy per layer)."""
    from nanomt.model import GPT, ModelConfig
    from nanomt.parallel.random import TensorParallelRNG

    def forbidden(self):
        raise AssertionError("fork() called with dropout 0")

    monkeypatch.setattr(TensorParallelRNG, "fork", forbidden)
    model = GPT(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=16,
                            vocab_size=64), None).train()
    tokens = torch.randint(0, 64, (2, 16))
    model(tokens, tokens).backward()
