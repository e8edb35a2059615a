"""The three parallelisms of MT-NLG (Smith et al. 2022), one module each: grid.py (the
tp x pp x dp rank layout), comm.py (collectives), tensor_parallel.py and mappings.py
(Megatron tensor and sequence parallelism), pipeline/ (interleaved 1F1B) and zero/
(ZeRO-sharded data parallelism)."""
