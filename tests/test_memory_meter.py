"""PeakMemoryMeter counts storages created while it watches, and nothing that existed before:
views and in-place results of an earlier tensor (the weights) are no new memory."""

from __future__ import annotations

import threading

import torch

from nanomt.memory import PeakMemoryMeter
from nanomt.parallel.data_parallel.buckets import resize_storage


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
    """ZeRO-3 frees a gathered buffer by resizing its storage to 0 and gathers into it again."""
    with PeakMemoryMeter() as meter:
        buffer = torch.zeros(1024)
        resize_storage(buffer, 0)
        kept = torch.zeros(512)  # 4 KiB freed, 2 KiB new
        assert meter.current_bytes == 512 * 4
        resize_storage(buffer, 4096)
        assert meter.current_bytes == 4096 + 512 * 4
        del kept
        assert meter.bytes_now() == 4096
    assert meter.peak_bytes == 4096 + 512 * 4


def test_frees_on_another_thread_are_counted():
    """gloo's worker threads can drop the last reference to a collective's buffer."""
    with PeakMemoryMeter() as meter:
        holder = [torch.zeros(1024)]
        worker = threading.Thread(target=holder.clear)
        worker.start()
        worker.join()
        assert meter.bytes_now() == 0
        torch.zeros(256)
    assert meter.peak_bytes == 1024 * 4
