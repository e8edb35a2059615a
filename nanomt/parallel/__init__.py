"""The parallelisms of MT-NLG (Smith et al. 2022) and what they stand on, one module or package
each: grid.py (the tp x cp x pp x dp rank layout), comm.py (collectives with timeouts), launch.py
(joining a launch); tensor_parallel.py, mappings.py, cross_entropy.py and random.py (Megatron
tensor and sequence parallelism); context_parallel.py (ring attention over a cp group);
forward_backward.py, no_pipelining.py and pipeline/ (GPipe, 1F1B, interleaved 1F1B);
data_parallel/ (ZeRO-sharded data parallelism, stages 0-3); param_info.py (what each parameter
is a piece of) and deferred_init.py (building on the meta device)."""
