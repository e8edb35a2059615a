"""Every parameter's ParamInfo is made when the model is built and names the tensor of the
single-process model it is a piece of; checkpoints are written from it and checked against it."""

from __future__ import annotations

import json

import pytest
import torch

from nanomt.checkpoint import load_checkpoint, save_checkpoint
from nanomt.checkpoint.format import CheckpointError, META_FILE
from nanomt.model import GPT, ModelConfig
from nanomt.parallel.param_info import param_info

CFG = ModelConfig(num_layers=4, hidden_size=32, num_heads=4, seq_len=16, vocab_size=250)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_chunk_records_name_the_single_process_tensors(style):
    cfg = ModelConfig(**{**CFG.to_dict(), "style": style})
    whole = {name: p for name, p in GPT(cfg, None).named_parameters()}
    first = GPT(cfg, None, layer_range=range(0, 2), post_process=False)
    last = GPT(cfg, None, layer_range=range(2, 4), pre_process=False)
    seen = set()
    for chunk in (first, last):
        for local_name, param in chunk.named_parameters():
            info = param_info(param)
            expected = whole[info.name]  # "layers.0" of the last chunk is layer 2
            shape = list(expected.shape)
            if info.name in ("word_embedding.weight", "output_layer.weight"):
                shape[0] = cfg.vocab_size  # padding rows are no part of the model
            assert list(info.global_shape) == shape, info.name
            assert torch.equal(param, expected), info.name  # and holds its values
            assert not info.sequence_parallel  # no SP here
            if info.primary:
                seen.add(info.name)
    assert seen == set(whole)  # every tensor has exactly one primary copy
    assert param_info(last.layers[0].mlp.fc1.weight).name == "layers.2.mlp.fc1.weight"
    if cfg.tie_embeddings:
        copy = param_info(last.word_embedding.weight)
        assert copy.tied_group == "word_embedding" and not copy.primary


def test_a_parameter_without_a_record_is_refused():
    with pytest.raises(ValueError, match="no ParamInfo"):
        param_info(torch.nn.Parameter(torch.zeros(3)))


def test_load_refuses_records_that_differ(tmp_path):
    model = GPT(CFG, None)
    save_checkpoint(tmp_path, 1, [model], None, None, {"model": CFG.to_dict()})
    meta_path = tmp_path / "step_00000001" / META_FILE
    meta = json.loads(meta_path.read_text())
    assert meta["parameters"]["layers.3.attention.proj.weight"] == {
        "global_shape": [32, 32], "tp_split_dim": 1, "tied_group": None}
    meta["parameters"]["layers.3.attention.proj.weight"]["tp_split_dim"] = 0
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="layers.3.attention.proj.weight"):
        load_checkpoint(tmp_path, [GPT(CFG, None)], None, None, CFG.to_dict(), verify=False)
