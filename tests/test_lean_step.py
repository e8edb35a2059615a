"""The lean step: gradients accumulated in place in the flat buffers and the memory meter's lazy
sweep, each against its plain counterpart. (The AdamW update and the fused gradient norm are
torch's, tested against torch's references in tests/test_optim.py.)"""

from __future__ import annotations

import pytest
import torch

from nanomt.model import GPT, ModelConfig

CFG = ModelConfig(num_layers=1, hidden_size=32, num_heads=4, seq_len=16)


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
