"""Pipeline parallelism: partitioning into chunks, point-to-point messages, schedules, timelines."""

from nanomt.parallel.pipeline.engine import PipelineStats, forward_backward_pipelining
from nanomt.parallel.pipeline.partition import (
    allreduce_embedding_grads,
    chunk_layer_ranges,
)
from nanomt.parallel.pipeline.schedules import check_pipeline_config, schedule_order
from nanomt.parallel.pipeline.timeline import Timeline

__all__ = ["PipelineStats", "Timeline", "allreduce_embedding_grads",
           "check_pipeline_config", "chunk_layer_ranges", "forward_backward_pipelining",
           "schedule_order"]
