"""ZeRO-2/3: how many reduce-scatters may be in flight at once (parallel.reduce_in_flight_mb).

A ZeRO-2/3 bucket's full gradient buffer can be freed only once its reduce-scatter is done, and
waiting for one stalls the backward that launched it. The bound trades the two:

    launching a reduce-scatter   first wait for the oldest in flight, while their full buffers
                                 plus this one exceed the bound (one is always allowed)
    allocating a full buffer     first retire those already done, without waiting

What it buys: memory, and overlap within that memory. Without a bound every full buffer would
live until finish_grad_sync, g Psi at the end of backward as at ZeRO-1; with the default bound
(one bucket, `bucket_size_mb`) at most about one bucket waits besides those being filled, so
ZeRO-2's gradient bytes after backward are g Psi / N_d (tests/test_zero.py checks them against
the formula and against the memory meter). A larger bound lets several reductions overlap the
rest of backward: on NCCL a wait orders the compute stream after the reduction's, so with one
in flight a reduce-scatter slower than the next bucket's backward stalls the compute; on this
machine's gloo CPU ranks it was measured to change nothing but the timing
(tests/test_zero_traffic.py, reduce_in_flight_mb=64: same traffic, norms and weights).
"""

from __future__ import annotations

from nanomt.parallel.data_parallel.memory_accounting import storage_bytes


class BoundedReductionsInFlight:
    """Mixed into the ZeRO-2/3 buffer: `self.in_flight` (oldest first), `self.in_flight_limit`
    bytes, and `self._retire(reduction)` come from GradientBuffer."""

    def _make_room(self, nbytes: int) -> None:
        """Retire the oldest reductions until `nbytes` more fit in the bound."""
        held = sum(storage_bytes(r.full) for r in self.in_flight)
        while self.in_flight and held + nbytes > self.in_flight_limit:
            oldest = self.in_flight.pop(0)
            held -= storage_bytes(oldest.full)
            self._retire(oldest)

    def _retire_completed(self) -> None:
        """Retire the reductions already done, oldest first, up to the first still running
        (a bucket's first round writes its shard, later ones add: keep their order)."""
        while self.in_flight and (self.in_flight[0].work is None
                                  or self.in_flight[0].work.is_completed()):
            self._retire(self.in_flight.pop(0))
