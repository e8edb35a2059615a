"""The optimizer training uses (ShardedAdamW: torch's AdamW over views of the fp32 shards, the
global gradient norm and clipping) against torch's own, the parameter groups (MT-NLG recipe),
the learning-rate schedule, and a rank whose shards hold only padding."""

import math

import pytest
import torch

from nanomt.model import GPT, ModelConfig
from nanomt.optim import ShardedAdamW
from nanomt.optim.grad_norm import read_norm, squares_and_verdict
from nanomt.optim.schedule import WarmupCosine
from nanomt.parallel.data_parallel import GradientBuffer, finalize_grads
from nanomt.parallel.param_info import ParamInfo, set_param_info
from nanomt.testing import run_distributed

CFG = ModelConfig(num_layers=1, hidden_size=16, num_heads=2, seq_len=8, vocab_size=50)


def test_warmup_then_cosine_to_the_floor():
    lr = WarmupCosine(max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert lr(0) == 0.0  # 0-based t: the first step runs at lr * 0 / T_warm (schedule.py)
    assert lr(9) == pytest.approx(0.9)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)
    values = [lr(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_schedule_rejects_floor_above_peak():
    with pytest.raises(ValueError, match="min_lr"):
        WarmupCosine(max_lr=0.1, min_lr=1.0, warmup_steps=1, decay_steps=10)


def sharded_adamw(model: GPT, grad_clip: float, weight_decay: float = 0.1) -> ShardedAdamW:
    """The optimizer training uses, over `model` alone (ZeRO-0, no grid), small buckets."""
    buffer = GradientBuffer([model], None, zero_stage=0, num_microbatches=1,
                            bucket_size_mb=0.01)
    return ShardedAdamW(buffer, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                        weight_decay=weight_decay, grad_clip=grad_clip)


def test_no_weight_decay_on_biases_and_norms():
    """torch's AdamW inside ShardedAdamW: the decay group holds the matrices, the other group
    (weight decay 0) the biases and norm gains."""
    model = GPT(CFG, None, seed=3)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = sharded_adamw(model, grad_clip=1.0)
    param_of = {id(view): s.param for _, s, view in optimizer.views}
    decay, no_decay = optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    no_decay_names = {names[id(param_of[id(v)])] for v in no_decay["params"]}
    decay_names = {names[id(param_of[id(v)])] for v in decay["params"]}
    assert all(("bias" in n) or ("norm" in n) for n in no_decay_names)
    assert "layers.0.norm1.weight" in no_decay_names
    assert "layers.0.attention.qkv.bias" in no_decay_names
    assert decay_names >= {"word_embedding.weight", "layers.0.mlp.fc1.weight"}
    assert decay_names | no_decay_names == set(names.values())


def test_single_process_clipping_equals_torch():
    """The norm and the clipped gradients ShardedAdamW hands to AdamW equal
    torch.nn.utils.clip_grad_norm_ on a copy of the model, once clipping (max_norm far below
    the norm) and once leaving the gradients alone."""
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    for max_norm in (0.01, 1e4):
        ours, theirs = GPT(CFG, None, seed=3), GPT(CFG, None, seed=3)
        optimizer = sharded_adamw(ours, grad_clip=max_norm)
        ours(x, x).backward()
        theirs(x, x).backward()
        finalize_grads(optimizer.buffer)
        norm, overflow, _ = read_norm(optimizer.clip_grads())
        torch_norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
        assert norm == pytest.approx(float(torch_norm), rel=1e-6) and not overflow
        assert norm > 0.01 * 10  # the first max_norm really clips
        clipped = {id(s.param): view.grad for _, s, view in optimizer.views}
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(clipped[id(p)], q.grad.reshape(-1), rtol=1e-6, atol=0,
                                       msg=name)


def test_sharded_adamw_is_torch_adamw_bit_for_bit():
    """Without clipping, ShardedAdamW's update (torch's foreach AdamW over views of the flat
    shards) equals torch.optim.AdamW's single-tensor reference on the model's own parameters,
    bit for bit, with weight decay on the matrices and the learning rate changing per step."""
    ours, theirs = GPT(CFG, None, seed=3), GPT(CFG, None, seed=3)
    optimizer = sharded_adamw(ours, grad_clip=0.0)
    groups = [{"params": [p for p in theirs.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in theirs.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    reference = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        for opt in (optimizer, reference):
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (step + 1)
        x = torch.randint(0, 50, (2, 8), generator=generator)
        optimizer.zero_grad()
        reference.zero_grad()
        ours(x, x).backward()
        theirs(x, x).backward()
        reference.step()
        assert not optimizer.step().skipped
    assert optimizer.step_count == 5
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name


def test_an_inf_gradient_skips_the_update_and_keeps_adams_step():
    model = GPT(CFG, None, seed=3)
    optimizer = sharded_adamw(model, grad_clip=1.0)
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    model(x, x).backward()
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    moments = [t.clone() for shard in optimizer.shards for t in (shard.exp_avg, shard.exp_avg_sq)]
    optimizer.zero_grad()
    model(x, x).backward()
    finalize_grads(optimizer.buffer)
    optimizer.buffer.local_grad_shards()[0][0] = float("inf")
    result = optimizer.step()
    assert result.skipped and not math.isfinite(result.grad_norm)
    assert optimizer.step_count == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(a, t) for a, t in zip(moments, (t for shard in optimizer.shards
                                                           for t in (shard.exp_avg,
                                                                     shard.exp_avg_sq))))


def test_fused_norm_matches_the_plain_norm_and_flags_inf():
    """grad_norm's one foreach norm kernel against torch.cat(...).norm(); the values read
    along travel in the same host copy; an inf or a nan anywhere, counted or not, flags."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 50, 500)]
    for i, param in enumerate(params):
        set_param_info(param, ParamInfo(f"p{i}", tuple(param.shape), tp_split_dim=None))
    grads = [torch.randn(p.numel(), generator=generator) for p in params]
    cpu = torch.device("cpu")
    totals = squares_and_verdict(list(zip(params, grads)), cpu, None)
    norm, overflow, along = read_norm(totals, torch.tensor([2.5, 7.0], dtype=torch.float64))
    expected = torch.cat(grads).norm()
    assert not overflow and along == [2.5, 7.0]  # read in the same host copy
    assert float(totals[0].sqrt()) == pytest.approx(float(expected), rel=1e-6)
    assert norm == pytest.approx(float(expected), rel=1e-6)
    grads[1][3] = float("inf")
    assert read_norm(squares_and_verdict(list(zip(params, grads)), cpu, None))[1]
    grads[1][3] = float("nan")
    assert read_norm(squares_and_verdict(list(zip(params, grads)), cpu, None,
                                         count_squares=False))[1]


# ---- a rank whose shards hold only padding --------------------------------------------------
def tiny_linear(device: str | torch.device = "cpu") -> torch.nn.Module:
    """nn.Linear(1, 2): a weight and a bias of 2 elements each. In buckets of one parameter
    over dp = 4, each pads to 4 and splits into shards of 1: dp ranks 2 and 3 hold padding
    only, and no piece of any gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 2, device=device)
    for name, param in model.named_parameters():
        set_param_info(param, ParamInfo(name, tuple(param.shape), tp_split_dim=None))
    return model


def padded_optimizer(model: torch.nn.Module, grid, stage: int) -> ShardedAdamW:
    buffer = GradientBuffer([model], grid, zero_stage=stage, num_microbatches=1,
                            bucket_size_mb=1e-6)
    return ShardedAdamW(buffer, lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                        grad_clip=0.5)


def recording_collectives(monkeypatch) -> list[torch.device]:
    """Wrap the collectives nanomt.parallel.comm calls; return the devices of every tensor
    handed to them, as they are called."""
    from nanomt.parallel import comm

    devices: list[torch.device] = []

    def recording(collective):
        def call(*args, **kwargs):
            devices.extend(a.device for a in args if isinstance(a, torch.Tensor))
            return collective(*args, **kwargs)
        return call

    monkeypatch.setattr(torch.distributed, "all_reduce", recording(torch.distributed.all_reduce))
    for name in ("_all_gather_single", "_reduce_scatter_single"):
        monkeypatch.setattr(comm, name, recording(getattr(comm, name)))
    return devices


def _padding_rank_steps(stage: int) -> dict:
    from nanomt.parallel.grid import ParallelGrid

    grid = ParallelGrid(1, 1, 4)
    model = tiny_linear()
    optimizer = padded_optimizer(model, grid, stage)
    x = torch.tensor([[1.0], [-2.0]]) * (grid.dp_rank + 1)  # different data on every dp rank
    norms = []
    for _ in range(3):
        optimizer.zero_grad()
        (model(x).square().sum() / 4).backward()  # the mean over dp: the buffer sums
        norms.append(optimizer.step().grad_norm)
    with optimizer.full_parameters():
        weights = [p.detach().clone() for p in model.parameters()]
    return {"segments": sum(len(b.segments) for b in optimizer.buckets), "norms": norms,
            "weights": weights}


@pytest.mark.parametrize("stage", [1, 2])
def test_a_rank_of_padding_only_steps_as_the_single_process(stage):
    """dp = 4 ranks, each with its own data; ranks 2 and 3 hold only padding. Every rank gets
    the single process's norms and weights (torch's AdamW and clip_grad_norm_ on the mean
    gradient of the four ranks' data)."""
    results = run_distributed(_padding_rank_steps, world_size=4, args=(stage,), timeout_s=240)
    assert [r["segments"] for r in results] == [2, 2, 0, 0]
    model = tiny_linear()
    reference = torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.1},
                                   {"params": [model.bias], "weight_decay": 0.0}],
                                  lr=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    xs = [torch.tensor([[1.0], [-2.0]]) * (rank + 1) for rank in range(4)]
    norms = []
    for _ in range(3):
        reference.zero_grad()
        sum(model(x).square().sum() for x in xs).div(4 * 4).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        reference.step()
    for r in results:
        assert r["norms"] == pytest.approx(norms, rel=1e-6)
        for ours, theirs in zip(r["weights"], model.parameters()):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)


def test_every_tensor_a_padding_rank_hands_to_a_collective_is_on_its_device(monkeypatch):
    """dp rank 2 of 4 (no piece of any gradient), its model on the meta device standing in for
    a GPU, over torch's fake process group: the norm's totals, the reductions and the
    parameters' all-gather all hand over tensors on the step's device, never a CPU fallback
    (NCCL rejects CPU tensors)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from nanomt.parallel.grid import ParallelGrid

    dist.init_process_group("fake", store=FakeStore(), rank=2, world_size=4)
    try:
        grid = ParallelGrid(1, 1, 4)
        model = tiny_linear(device="meta")
        optimizer = padded_optimizer(model, grid, stage=1)
        assert not any(b.segments for b in optimizer.buckets)
        devices = recording_collectives(monkeypatch)
        optimizer.zero_grad()
        model(torch.ones(2, 1, device="meta")).sum().backward()
        finalize_grads(optimizer.buffer)
        totals = optimizer.clip_grads()
        optimizer.step(0.0, overflow=False)  # the verdict is read on the host: here, given
    finally:
        dist.destroy_process_group()
    assert totals.device.type == "meta"
    assert len(devices) >= 4  # two reduce-scatters, the norm's all-reduce, two all-gathers
    assert {d.type for d in devices} == {"meta"}
