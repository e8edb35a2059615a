"""Counting what a ZeRO-3 gatherer does, for the tests: a wrapper around one gatherer's methods
(nanomt.parallel.data_parallel.stage3 / zero3_prefetch), so the package holds no counters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GatherStats:
    gathers: int = 0           # all-gathers issued over dp (synchronous and prefetched)
    prefetches: int = 0        # units whose gather was launched ahead of their use
    prefetch_hits: int = 0     # ... and then claimed by the unit's own forward or backward
    prefetch_misses: int = 0   # ... and freed unused (a wrong guess, or released by step())
    peak_layers: int = 0       # most transformer-layer units materialised at once


def watch_gathers(gatherer) -> GatherStats:
    """Wrap `gatherer`'s launch, gather, free and prefetch so that they count into the
    returned GatherStats (hooks call them through the instance, so they see the wrappers)."""
    stats = GatherStats()
    ahead = getattr(gatherer, "ahead", [])  # only a PrefetchingGatherer guesses ahead
    launch, gather, free = gatherer._launch, gatherer.gather, gatherer.free

    def counted_launch(unit, async_op=False):
        stats.gathers += sum(not b.gathered and b.group_size > 1 for b in unit.buckets)
        launch(unit, async_op)
        if unit.is_layer:
            live = sum(u.is_layer and u.materialised for u in gatherer.units.values())
            stats.peak_layers = max(stats.peak_layers, live)

    def counted_gather(unit):
        stats.prefetch_hits += unit in ahead
        gather(unit)

    def counted_free(unit):
        stats.prefetch_misses += unit in ahead
        free(unit)

    gatherer._launch, gatherer.gather, gatherer.free = counted_launch, counted_gather, counted_free
    if hasattr(gatherer, "_prefetch"):
        prefetch = gatherer._prefetch

        def counted_prefetch(unit):
            was_ahead = unit in ahead
            prefetch(unit)
            stats.prefetches += unit in ahead and not was_ahead

        gatherer._prefetch = counted_prefetch
    return stats
