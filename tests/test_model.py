"""The single-process GPT: the reference every parallel layout is compared against."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanomt.model import GPT, ModelConfig
from nanomt.parallel.blockwise_init import NormalInit
from model_outputs import full_logits


def tiny(style="gpt", **kw):
    base = dict(num_layers=2, hidden_size=32, num_heads=4, seq_len=16, vocab_size=97, style=style)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_loss_is_cross_entropy_of_the_logits(style):
    model = GPT(tiny(style))
    tokens = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    logits = full_logits(model, tokens)
    assert logits.shape == (3, 16, 97)
    expected = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1))
    torch.testing.assert_close(model(tokens, targets), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_attention_is_causal(style):
    model = GPT(tiny(style))
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    a, b = full_logits(model, tokens), full_logits(model, changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_parameter_count_matches_closed_form(style):
    cfg = tiny(style)
    model = GPT(cfg)
    padding_rows = cfg.padded_vocab_size() - cfg.vocab_size
    tables = 1 if cfg.tie_embeddings else 2
    assert model.num_local_parameters() == cfg.num_parameters() + tables * padding_rows * 32


def test_narayanan_formula_for_mtnlg_530b():
    """P = 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h)) with V = 51200 gives 529.6B (REFERENCE.md)."""
    cfg = ModelConfig(num_layers=105, hidden_size=20480, num_heads=128, seq_len=2048,
                      vocab_size=50257, init_std=4e-3)
    l, h, s, v = 105, 20480, 2048, cfg.padded_vocab_size(8)
    formula = 12 * l * h * h * (1 + 13 / (12 * h) + (v + s) / (12 * l * h))
    assert abs(formula / 1e9 - 529.6) < 0.1
    # our exact count (unpadded vocabulary) agrees with the formula to within the padding rows
    assert abs(cfg.num_parameters() + (v - 50257) * h - formula) / formula < 1e-6


def test_gpt_style_details():
    cfg = tiny("gpt", num_layers=4, hidden_size=256, num_heads=4, init_std=0.02)
    model = GPT(cfg)
    assert model.output_weight() is model.word_embedding.weight  # tied
    assert cfg.ffn_hidden_size == 4 * 256
    assert isinstance(model.layers[0].norm1, torch.nn.LayerNorm)
    # output projections scaled by 1/sqrt(2 * layers), the others not
    out_std = torch.cat([l.mlp.fc2.weight.flatten() for l in model.layers]).std().item()
    in_std = torch.cat([l.mlp.fc1.weight.flatten() for l in model.layers]).std().item()
    assert abs(in_std - 0.02) < 0.001
    assert abs(out_std - 0.02 / math.sqrt(8)) < 0.0005
    # padding rows of the word embedding start at zero
    assert torch.all(model.word_embedding.weight[97:] == 0)


def test_llama_style_details():
    cfg = tiny("llama")
    model = GPT(cfg)
    assert not cfg.tie_embeddings and model.output_weight() is model.output_layer.weight
    assert isinstance(model.layers[0].norm1, torch.nn.RMSNorm)
    assert model.layers[0].attention.qkv.bias is None
    assert not hasattr(model, "position_embedding")


def test_swiglu_reads_gate_and_up_from_one_fused_weight():
    """fc1 [2, ffn, h] = [gate; up]: the MLP is fc2(silu(gate x) * up x)."""
    cfg = tiny("llama", ffn_hidden_size=48)
    mlp = GPT(cfg).layers[0].mlp
    assert mlp.fc1.weight.shape == (2, 48, 32) and mlp.fc1.bias is None
    x = torch.randn(2, 16, 32)
    gate, up = mlp.fc1.weight
    expected = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), mlp.fc2.weight)
    torch.testing.assert_close(mlp(x), expected)


def test_same_seed_same_model_different_seed_different_model():
    a, b, c = GPT(tiny(), seed=1), GPT(tiny(), seed=1), GPT(tiny(), seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.layers[0].attention.qkv.weight, c.layers[0].attention.qkv.weight)


def test_pipeline_chunks_hold_the_same_layers_as_the_whole_model():
    """Layout-independent init: a chunk built with layer_range holds the whole model's layers."""
    cfg = tiny(num_layers=4)
    whole = GPT(cfg, seed=7)
    chunk = GPT(cfg, seed=7, layer_range=range(2, 4), pre_process=False)
    for i in range(2):
        for pw, pc in zip(whole.layers[2 + i].parameters(), chunk.layers[i].parameters()):
            assert torch.equal(pw, pc)
    torch.testing.assert_close(chunk.word_embedding.weight, whole.word_embedding.weight)


def test_blockwise_init_slices_concatenate_to_the_whole_tensor():
    """Any split of the rows (or columns) draws exactly the slices of the whole tensor."""
    init = NormalInit(0.02, 3, "layers.0.mlp.fc1")
    rows = init.slices((12, 40), dim=0, indices=range(12))
    for parts in (2, 3, 4):
        size = 12 // parts
        shards = [init.slices((12, 40), 0, range(i * size, (i + 1) * size)) for i in range(parts)]
        assert torch.equal(torch.cat(shards, dim=0), rows)
    columns = init.slices((40, 12), dim=1, indices=range(12))
    halves = [init.slices((40, 12), 1, range(0, 6)), init.slices((40, 12), 1, range(6, 12))]
    assert torch.equal(torch.cat(halves, dim=1), columns)
    assert abs(rows.std().item() - 0.02) < 0.003
    assert not torch.equal(init.child("other").slices((12, 40), 0, range(12)), rows)
    assert not torch.equal(NormalInit(0.02, 4, init.name).slices((12, 40), 0, range(12)), rows)


def test_bad_model_configs_fail_clearly():
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="style"):
        ModelConfig(style="bert")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"num_layer": 3})


def test_split_heads_gradient_equals_autograds_own():
    """SplitHeads copies q, k, v's gradients straight into qkv's layout; autograd's own
    view -> permute -> unbind is the reference (bitwise: both only move numbers). v unused:
    its gradient must be zero."""
    from nanomt.model.split_heads import SplitHeads

    s, b, heads, d = 5, 3, 4, 2
    qkv = torch.randn(s, b, heads * 3 * d, requires_grad=True)
    weights = [torch.randn(b, heads, s, d) for _ in range(2)]

    def loss_of(q, k, v):
        assert q.shape == k.shape == v.shape == (b, heads, s, d)
        return (q * weights[0]).sum() + (k.exp() * weights[1]).sum()

    ours = torch.autograd.grad(loss_of(*SplitHeads.apply(qkv, heads, d)), qkv)[0]
    own = qkv.view(s, b, heads, 3, d).permute(3, 1, 2, 0, 4).unbind(0)
    reference = torch.autograd.grad(loss_of(*own), qkv)[0]
    assert torch.equal(ours, reference)
    assert ours.view(s, b, heads, 3, d)[..., 2, :].abs().sum() == 0
    assert all(torch.equal(x, y) for x, y in zip(SplitHeads.apply(qkv, heads, d), own))
