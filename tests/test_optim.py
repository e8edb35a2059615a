"""Learning-rate schedule and AdamW parameter groups (MT-NLG recipe)."""

import copy
import math

import pytest
import torch

from nanomt.model import GPT, ModelConfig
from nanomt.optim.adamw import parameter_groups
from nanomt.optim.grad_norm import clip_grad_norm
from nanomt.optim.schedule import WarmupCosine


def test_warmup_then_cosine_to_the_floor():
    lr = WarmupCosine(max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert lr(0) == pytest.approx(0.1)
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)
    values = [lr(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_schedule_rejects_floor_above_peak():
    with pytest.raises(ValueError, match="min_lr"):
        WarmupCosine(max_lr=0.1, min_lr=1.0, warmup_steps=1, decay_steps=10)


def test_no_weight_decay_on_biases_and_norms():
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_heads=2, seq_len=8, vocab_size=50)
    model = GPT(cfg)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert all(("bias" in n) or ("norm" in n) for n in no_decay_names)
    assert "layers.0.norm1.weight" in no_decay_names
    assert "layers.0.attention.qkv.bias" in no_decay_names
    assert {names[id(p)] for p in decay["params"]} >= {"word_embedding.weight",
                                                       "layers.0.mlp.fc1.weight"}


def test_single_process_clipping_equals_torch():
    """Norm and clipped gradients equal torch.nn.utils.clip_grad_norm_ on a copy of the model,
    once clipping (max_norm far below the norm) and once leaving the gradients alone."""
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_heads=2, seq_len=8, vocab_size=50)
    model = GPT(cfg)
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    model(x, x).backward()
    for max_norm in (0.01, 1e4):
        # nanomt's side is built (its parameters carry ParamInfo, which deepcopy drops)
        ours, theirs = GPT(cfg), copy.deepcopy(model)
        for a, b, p in zip(ours.parameters(), theirs.parameters(), model.parameters()):
            a.grad, b.grad = p.grad.clone(), p.grad.clone()
        norm = clip_grad_norm(list(ours.parameters()), max_norm, grid=None)
        torch_norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
        assert norm == pytest.approx(float(torch_norm), rel=1e-6)
        assert norm > 0.01 * 10  # the first max_norm really clips
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, msg=name)
