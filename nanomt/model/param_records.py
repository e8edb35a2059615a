"""Every parameter's ParamInfo (nanomt.parallel.param_info), made once when a model is built.

The tensor-parallel layers declare the dim each of their parameters is split along
(`tp_split_dims`); everything else (norms, the position embedding) is replicated over tp. Under
sequence parallelism every replicated parameter acts on this rank's s/t tokens only (norms,
row-parallel biases added after the reduce-scatter, the positions of the shard), so its
gradient is partial over tp. A mixture of experts (nanomt.model.moe) routes the tokens of its
whole tp group on every tp rank, so its router's gradient is complete there; its stacked
expert weights are `expert` parameters, dim 0 split over the ep group. Names and shapes are those of the single-process model, so norms,
gradient buffers and checkpoints never depend on the layout.
"""

from __future__ import annotations

from torch import nn

from nanomt.model.moe import ExpertWeights, Router
from nanomt.parallel.param_info import ParamInfo, set_param_info
from nanomt.parallel.tensor_parallel import (
    TENSOR_PARALLEL_LAYERS,
    VocabParallelEmbedding,
    VocabParallelOutput,
)


def global_parameter_name(local_name: str, layer_range: range) -> str:
    """"layers.<i>.rest" of a pipeline chunk -> "layers.<layer_range[i]>.rest" of the model."""
    parts = local_name.split(".")
    if parts[0] == "layers":
        parts[1] = str(layer_range[int(parts[1])])
    return ".".join(parts)


def describe_parameters(model: nn.Module) -> None:
    """Give every parameter of `model` (a GPT or a pipeline chunk of one) its ParamInfo."""
    split_dims = {f"{module_name}.{name}": dim for module_name, module in model.named_modules()
                  if isinstance(module, TENSOR_PARALLEL_LAYERS + (ExpertWeights,))
                  for name, dim in module.tp_split_dims.items()}
    experts = {f"{name}.weight" for name, module in model.named_modules()
               if isinstance(module, ExpertWeights)}
    routers = {f"{name}.weight" for name, module in model.named_modules()
               if isinstance(module, Router)}
    vocab_rows = {f"{module_name}.weight" for module_name, module in model.named_modules()
                  if isinstance(module, (VocabParallelEmbedding, VocabParallelOutput))}
    for local_name, param in model.named_parameters():
        split_dim = split_dims.get(local_name)
        shape = list(param.shape)
        if split_dim is not None:
            shape[split_dim] *= model.tp_size
        if local_name in vocab_rows:  # padding rows are not part of the model
            shape[0] = model.cfg.vocab_size
        if local_name in experts:
            shape[0] *= model.ep_size
        tied = local_name == "word_embedding.weight" and model.cfg.tie_embeddings
        set_param_info(param, ParamInfo(
            name=global_parameter_name(local_name, model.layer_range),
            global_shape=tuple(shape), tp_split_dim=split_dim,
            sequence_parallel=(model.sequence_parallel and split_dim is None
                               and local_name not in routers),
            tied_group="word_embedding" if tied else None,
            primary=not tied or model.pre_process,  # the first stage's copy counts
            expert=local_name in experts))
