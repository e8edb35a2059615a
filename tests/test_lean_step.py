"""The lean step: gradients accumulated in place in the flat buffers, the multi-tensor AdamW, the
fused gradient norm, and the memory meter's lazy sweep, each against its plain counterpart."""

from __future__ import annotations

import pytest
import torch

from nanomt.model import GPT, ModelConfig

CFG = ModelConfig(num_layers=1, hidden_size=32, num_heads=4, seq_len=16)


def test_foreach_adamw_is_the_single_tensor_update_bit_for_bit():
    """The multi-tensor update and its device-gated twin (logging.metrics_interval > 1) both
    equal the single-tensor path bit for bit."""
    from nanomt.optim.adamw import adamw_update_, adamw_update_foreach_, adamw_update_foreach_gated_

    generator = torch.Generator().manual_seed(0)
    sizes = (1000, 7, 333)
    single = [[torch.randn(n, generator=generator), torch.zeros(n), torch.zeros(n)]
              for n in sizes]
    multi = [[t.clone() for t in state] for state in single]
    gated = [[t.clone() for t in state] for state in single]
    for step in range(1, 6):
        grads = [torch.randn(n, generator=generator) for n in sizes]
        for (master, m, v), grad in zip(single, grads):
            adamw_update_(master, grad, m, v, step, 3e-3, (0.9, 0.95), 1e-8)
        adamw_update_foreach_([s[0] for s in multi], grads, [s[1] for s in multi],
                              [s[2] for s in multi], step, 3e-3, (0.9, 0.95), 1e-8)
        adamw_update_foreach_gated_([s[0] for s in gated], [g.clone() for g in grads],
                                    [s[1] for s in gated], [s[2] for s in gated],
                                    torch.tensor(step), 3e-3, (0.9, 0.95), 1e-8,
                                    update=torch.tensor(True))
    for a, b, c in zip(single, multi, gated):
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y) and torch.equal(x, z)
    # gated off on the device: inf/nan gradients leave every tensor as it was
    before = [[t.clone() for t in state] for state in multi]
    grads = [torch.full((n,), float("nan")) for n in sizes]
    grads[1][0] = float("inf")
    adamw_update_foreach_gated_([s[0] for s in multi], grads, [s[1] for s in multi],
                                [s[2] for s in multi], torch.tensor(6), 3e-3, (0.9, 0.95),
                                1e-8, update=torch.tensor(False))
    for a, b in zip(before, multi):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("stage", [0, 1])
def test_gradients_accumulate_in_place_in_the_bucket(stage):
    """At stages 0-1 the step's first gradient is copied into the bucket's flat gradient buffer
    and `param.grad` becomes a view of it: later micro-batches accumulate there (no new
    gradient tensor), equal to the sum of plain .grad. The buffer is never zeroed, so the
    second step must not see the first's gradients, and a parameter without a gradient in a
    step reads zero once the bucket is reduced."""
    from nanomt.parallel.data_parallel import GradientBuffer

    plain, flat = GPT(CFG, None, seed=3), GPT(CFG, None, seed=3)
    buffer = GradientBuffer([flat], None, zero_stage=stage, num_microbatches=2,
                            bucket_size_mb=0.01)
    tokens = torch.randint(0, 256, (2, 2, 2, 16), generator=torch.Generator().manual_seed(0))
    for step, micro_batches in enumerate(tokens):
        plain.zero_grad(set_to_none=True)
        buffer.zero_grad()
        assert all(p.grad is None for p in flat.parameters())
        for index, micro in enumerate(micro_batches):
            plain(micro, micro).backward()
            flat(micro, micro).backward()
            if index == 0:
                first = {name: p.grad.data_ptr() for name, p in flat.named_parameters()}
        buffer.finish_grad_sync()
        plain_grads = dict(plain.named_parameters())
        for name, p in flat.named_parameters():
            bucket = buffer.bucket_of[id(p)]
            offset = buffer.offset_of[id(p)]
            assert p.grad.data_ptr() == first[name]
            assert p.grad.data_ptr() == bucket.grad_buffer[offset:].data_ptr(), name
            torch.testing.assert_close(p.grad, plain_grads[name].grad, rtol=1e-6, atol=1e-7)
    # a step in which the final norm's weight gets no gradient: its stale values are zeroed
    frozen = flat.final_norm.weight
    frozen.requires_grad_(False)
    buffer.zero_grad(num_microbatches=1)
    flat(tokens[0, 0], tokens[0, 0]).backward()
    buffer.finish_grad_sync()
    assert frozen.grad is not None and not frozen.grad.any()
    assert buffer.bucket_of[id(frozen)].grad_buffer.isfinite().all()


def test_zero2_gradients_accumulate_in_the_full_buffer_while_it_exists():
    """At ZeRO-2 `param.grad` is a view of the bucket's full gradient buffer from the round's
    first gradient on (later micro-batches add there in place); at the reduction the views are
    dropped and the reduced shard equals the sum of plain .grad over three micro-batches."""
    from nanomt.parallel.data_parallel import GradientBuffer

    plain, flat = GPT(CFG, None, seed=3), GPT(CFG, None, seed=3)
    buffer = GradientBuffer([flat], None, zero_stage=2, num_microbatches=3,
                            bucket_size_mb=0.01)
    assert len(buffer.buckets) > 1
    tokens = torch.randint(0, 256, (3, 2, 16), generator=torch.Generator().manual_seed(0))
    for index, micro in enumerate(tokens):
        plain(micro, micro).backward()
        flat(micro, micro).backward()
        if index == 0:
            for p in flat.parameters():
                bucket = buffer.bucket_of[id(p)]
                offset = buffer.offset_of[id(p)]
                assert p.grad.data_ptr() == bucket.grad_buffer[offset:].data_ptr()
    buffer.finish_grad_sync()
    plain_grads = {id(f): q.grad for f, q in zip(flat.parameters(), plain.parameters())}
    for p in flat.parameters():
        assert p.grad is None
        bucket = buffer.bucket_of[id(p)]
        offset = buffer.offset_of[id(p)]
        torch.testing.assert_close(bucket.grad_shard[offset: offset + p.numel()],
                                   plain_grads[id(p)].reshape(-1), rtol=1e-6, atol=1e-7)


def test_fused_norm_matches_the_plain_norm_and_flags_inf():
    from nanomt.optim.grad_norm import norm_and_overflow
    from nanomt.parallel.param_info import ParamInfo, set_param_info

    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 50, 500)]
    for i, param in enumerate(params):
        set_param_info(param, ParamInfo(f"p{i}", tuple(param.shape), tp_split_dim=None))
    grads = [torch.randn(p.numel(), generator=generator) for p in params]
    norm, value, overflow, along = norm_and_overflow(
        list(zip(params, grads)), None, read_along=torch.tensor([2.5, 7.0], dtype=torch.float64))
    expected = torch.cat(grads).norm()
    assert not overflow and along == [2.5, 7.0]  # read in the same host copy
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    assert value == pytest.approx(float(expected), rel=1e-6)
    grads[1][3] = float("inf")
    assert norm_and_overflow(list(zip(params, grads)), None)[2]
    grads[1][3] = float("nan")
    assert norm_and_overflow(list(zip(params, grads)), None, count_squares=False)[2]


def test_lazy_memory_sweep_finds_the_true_peak():
    """A peak reached, freed, and reached again at reused addresses: the meter reports the
    largest set of storages alive at once."""
    from nanomt.memory import PeakMemoryMeter

    with PeakMemoryMeter() as meter:
        a = torch.ones(1000)           # 4000 bytes
        b = torch.ones(2000)           # 12000 alive
        del a, b
        for _ in range(5):             # 8000 bytes alive at once, allocated again and again
            c = torch.ones(1000)
            d = torch.ones(1000)
            del c, d
        e = torch.ones(3000)           # 12000 alive on its own
        f = torch.ones(250)            # 13000: the peak
        del e, f
    assert meter.peak_bytes == 13000
