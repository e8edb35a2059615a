"""Watching a run from outside, for the tests: what a step computes in, what a meter still holds,
what connects to a server.

`step_dtypes(cfg, run_dir)` reports the dtypes one training step really uses (mixed-precision
tests assert them instead of trusting a loss gap). `settled_bytes(meter)` reads a
PeakMemoryMeter once gloo's worker threads have let go of the last collective's buffers.
`ConnectionCounter` stands in for a server (W&B's) and counts what connects to it.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from nanomt.memory import PeakMemoryMeter
from nanomt.trainer import setup


def step_dtypes(cfg: DictConfig, run_dir: Path) -> dict[str, set[torch.dtype]]:
    """Set up a run of `cfg` (nanomt.trainer.setup) and train one step; return the dtypes it used:
    "params" (the model's, for compute), "autograd_grads" (what backward delivers to each
    parameter), "accumulated_grads" (what the optimizer accumulates and reduces) and "masters"
    (the weights AdamW updates). Collective when cfg is a parallel layout: call on every rank."""
    trainer = setup(cfg, Path(run_dir))
    params = [p for chunk in trainer.model_chunks for p in chunk.parameters()]
    delivered: set[torch.dtype] = set()
    hooks = [p.register_hook(lambda grad: delivered.add(grad.dtype)) for p in params]
    trainer.train_step(0, PeakMemoryMeter())
    for hook in hooks:
        hook.remove()
    optimizer = trainer.optimizer
    return {"params": {p.dtype for p in params}, "autograd_grads": delivered,
            "accumulated_grads": {g.dtype for g in optimizer.buffer.local_grad_shards()},
            "masters": {shard.master.dtype for shard in optimizer.shards}}


class ConnectionCounter:
    """A TCP server on the loopback that records what connects to it: point a client's server
    address here (W&B's WANDB_BASE_URL) to show it sends nothing. `http_requests` keeps the
    first bytes of each connection that speaks HTTP (on a shared machine a stray process may
    connect to a port it once held; that is not a request)."""

    HTTP_METHODS = (b"GET", b"POST", b"PUT", b"HEAD", b"PATCH", b"DELETE", b"OPTIONS")

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.first_bytes: list[bytes] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    @property
    def http_requests(self) -> list[bytes]:
        return [data for data in self.first_bytes if data.startswith(self.HTTP_METHODS)]

    def _accept(self) -> None:
        while not self.stopped:
            try:
                connection = self.sock.accept()[0]
            except OSError:
                continue
            with connection:
                connection.settimeout(2.0)
                try:
                    self.first_bytes.append(connection.recv(64))
                except OSError:
                    self.first_bytes.append(b"")

    def stop(self) -> None:
        self.stopped = True
        self.thread.join()
        self.sock.close()


def settled_bytes(meter: PeakMemoryMeter, patience_s: float = 0.5) -> int:
    """meter.bytes_now() once it stops falling: gloo's worker thread can hold a collective's
    buffers a moment after wait() returns (each poll runs one op, which makes the meter forget
    what was freed)."""
    deadline = time.monotonic() + patience_s
    now = meter.bytes_now()
    while time.monotonic() < deadline:
        time.sleep(0.01)
        torch.empty(0)
        settled, now = now, meter.bytes_now()
        if now == settled:
            break
    return now
