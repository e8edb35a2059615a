"""Pipeline parallelism: partitioning into chunks, schedules, their messages, timelines."""

from nanomt.parallel.pipeline.engine import forward_backward_pipelining
from nanomt.parallel.pipeline.partition import (
    allreduce_embedding_grads,
    chunk_layer_ranges,
)
from nanomt.parallel.pipeline.schedules import schedule_order
from nanomt.parallel.pipeline.timeline import Timeline

__all__ = ["Timeline", "allreduce_embedding_grads", "chunk_layer_ranges",
           "forward_backward_pipelining", "schedule_order"]
