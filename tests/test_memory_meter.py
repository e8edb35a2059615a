"""PeakMemoryMeter counts storages created while it watches, and nothing that existed before:
views and in-place results of an earlier tensor (the weights) are no new memory."""

from __future__ import annotations

import torch

from nanomt.memory import PeakMemoryMeter


def test_views_of_existing_storage_are_not_counted():
    weight = torch.zeros(256, 1024)  # 1 MiB that exists before the meter starts
    with PeakMemoryMeter() as meter:
        weight.t()
        weight.view(-1)[:10]
        weight[3]
        weight.add_(1.0)
    assert meter.peak_bytes == 0


def test_new_storages_are_counted_and_freed():
    weight = torch.zeros(256, 1024)
    with PeakMemoryMeter() as meter:
        doubled = weight * 2  # 1 MiB
        view = doubled.t()   # same storage: nothing more
        del doubled, view
        small = weight[:128].clone()  # 0.5 MiB, after the first was freed
    assert meter.peak_bytes == 256 * 1024 * 4
    assert meter.current_bytes == small.untyped_storage().nbytes() == 128 * 1024 * 4


def test_storages_resized_in_place_count_their_current_size():
    """ZeRO-3 frees a gathered buffer with storage().resize_(0) and gathers into it again."""
    with PeakMemoryMeter() as meter:
        buffer = torch.zeros(1024)
        buffer.untyped_storage().resize_(0)
        torch.zeros(512)  # an op after the resize: 4 KiB freed, 2 KiB new
        assert meter.current_bytes == 512 * 4
        buffer.untyped_storage().resize_(4096)
        torch.zeros(1)
        assert meter.current_bytes == 4096 + 4
    assert meter.peak_bytes == 4096 + 4
