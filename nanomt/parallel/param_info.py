"""One record per parameter: what a local tensor is a piece of, and how its gradient is shared.

Every layer of parallelism asks the same few questions of a parameter, and they are answered
once, when the model is built (nanomt.model.param_records), in a `ParamInfo`:

    name               its name in the single-process model ("layers.7.mlp.fc1.weight", even in
                       a pipeline chunk that calls it "layers.0.mlp.fc1.weight")
    global_shape       its shape there (vocabulary rows unpadded: the same at every tp)
    tp_split_dim       the dim it is split along over the tensor-parallel group, each rank
                       holding a contiguous 1/t of it; None: replicated, equal on every tp rank
    sequence_parallel  its gradient is a partial sum over tp (a replica under sequence
                       parallelism sees only this rank's s/t tokens): finalize_grads sums it
    tied_group         copies of it live on other pipeline stages ("word_embedding": the tied
                       input/output embedding); their gradients are summed over that group
    primary            this copy is the one that counts: the global gradient norm counts it and
                       checkpoints store it (False for the last stage's copy of a tied embedding)
    expert             the stacked weights of a mixture of experts, [num_experts, ...]: dim 0
                       indexes the experts and is split over the ep group, each ep rank holding
                       a contiguous 1/ep of them; its gradient is averaged, and ZeRO shards it,
                       over grid.expert_dp_group instead of grad_sync_group

Readers: the gradient norm (count every value once), the gradient buffer (which sums are owed),
checkpoints (the layout-independent piece a local tensor is: box = the 1/t slice of
global_shape along tp_split_dim, Megatron's ShardedTensor idea).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

_ATTRIBUTE = "nanomt_param_info"


@dataclass(frozen=True)
class ParamInfo:
    """What this rank's tensor of a parameter is (module docstring)."""

    name: str
    global_shape: tuple[int, ...]
    tp_split_dim: int | None
    sequence_parallel: bool = False
    tied_group: str | None = None
    primary: bool = True
    expert: bool = False

    def box(self, local_shape: tuple[int, ...], tp_rank: int, ep_rank: int = 0
            ) -> list[list[int]]:
        """[start, stop) per dim: the region of the (padded) global tensor a local tensor of
        `local_shape` on tp rank `tp_rank` (and for experts, ep rank `ep_rank`) covers."""
        box = [[0, n] for n in local_shape]
        if self.tp_split_dim is not None:
            n = local_shape[self.tp_split_dim]
            box[self.tp_split_dim] = [tp_rank * n, (tp_rank + 1) * n]
        if self.expert:
            n = local_shape[0]
            box[0] = [ep_rank * n, (ep_rank + 1) * n]
        return box

    def to_json(self) -> dict:
        return asdict(self)


def set_param_info(param: nn.Parameter, info: ParamInfo) -> None:
    setattr(param, _ATTRIBUTE, info)


def param_info(param: nn.Parameter) -> ParamInfo:
    """The record of `param`; a parameter built outside nanomt.model has none: an error."""
    info = getattr(param, _ATTRIBUTE, None)
    if info is None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} has no ParamInfo: build "
                         f"models with nanomt.model (GPT describes its parameters)")
    return info
