"""Writing a safetensors file straight from live tensors, through one bounded staging buffer.

A safetensors file is

    8 bytes     N, the header's length (little-endian u64)
    N bytes     JSON: {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {}}
                (padded with spaces to a multiple of 8)
    the data    every tensor's bytes, row-major, back to back at its offsets

The header depends only on dtypes and shapes, so it is written first; then each tensor is copied
to the host in slices of at most `staging_bytes` (or the largest tensor, if smaller) through one
reused buffer and written out. A
save so holds, beyond what the run already holds, one staging buffer: not a device copy of the
optimizer state, nor a host copy of it, nor the serialized file in memory. The SHA-256 is
computed on the way.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

STAGING_BYTES = 16 * 2**20  # below one default gradient bucket (parallel.bucket_size_mb=25)

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


def safetensors_header(tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the padded JSON header of a file holding `tensors` in this order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, tensor in tensors:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"cannot store {key} of dtype {tensor.dtype} in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]],
                      metadata: dict[str, str],
                      staging_bytes: int = STAGING_BYTES) -> tuple[int, str]:
    """Write `tensors` (on any device; views are fine) to `path` and fsync it.
    Returns (bytes written, SHA-256 hex digest of the file)."""
    digest = hashlib.sha256()
    head = safetensors_header(tensors, metadata)
    largest = max((t.numel() * t.element_size() for _, t in tensors), default=0)
    staging_bytes = max(1, min(staging_bytes, largest))  # never more than the largest tensor
    staging = torch.empty(staging_bytes, dtype=torch.uint8,  # pinned only for GPU tensors
                          pin_memory=any(t.is_cuda for _, t in tensors))
    with open(path, "wb") as f:
        f.write(head)
        digest.update(head)
        written = len(head)
        for _, tensor in tensors:
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            for start in range(0, data.numel(), staging_bytes):
                part = data[start: start + staging_bytes]
                host = staging[: part.numel()]
                host.copy_(part)
                view = memoryview(host.numpy())
                f.write(view)
                digest.update(view)
                written += part.numel()
        f.flush()
        os.fsync(f.fileno())
    return written, digest.hexdigest()
