"""The mixture-of-experts layer in one process, against a deliberately naive reference: a python
loop over tokens and their k experts with plain matmuls, the router's losses from their
formulas (nanomt.model.moe's docstring)."""

import pytest
import torch
import torch.nn.functional as F

from nanomt.model import GPT, ModelConfig
from nanomt.model.config import MoEConfig
from nanomt.model.layers import make_mlp
from nanomt.model.moe import MoEMLP, moe_layers, set_aux_loss_scale
from nanomt.parallel.blockwise_init import NormalInit
from nanomt.parallel.expert_parallel import dispatch
from nanomt.parallel.param_info import param_info


def moe_config(style="llama", shared=1, every=1, **moe):
    settings = dict(num_experts=4, top_k=2, ffn_hidden_size=24, every=every,
                    shared_experts=shared, aux_loss_coef=0.1, z_loss_coef=0.01)
    settings.update(moe)
    return ModelConfig(num_layers=2, hidden_size=16, num_heads=2, seq_len=8, vocab_size=61,
                       style=style, moe=settings)


def build_layer(cfg, seed=3):
    layer = make_mlp(cfg, 0, None, NormalInit(0.2, seed, "mlp"), NormalInit(0.2, seed, "out"),
                     sequence_parallel=False)
    assert isinstance(layer, MoEMLP)
    return layer


def naive_expert(x, fc1, fc2, swiglu):
    """One expert on one token: plain matrix-vector products."""
    if swiglu:
        return fc2 @ (F.silu(fc1[0] @ x) * (fc1[1] @ x))
    return fc2 @ F.gelu(fc1 @ x, approximate="tanh")


def naive_dense(x, layer, swiglu):
    """The shared experts' dense MLP on one token (biases for gpt)."""
    fc1, fc2 = layer.fc1, layer.fc2
    w1 = fc1.weight.reshape(-1, x.shape[0])
    y = w1 @ x + (fc1.bias.reshape(-1) if fc1.bias is not None else 0)
    if swiglu:
        gate, up = y.chunk(2)
        y = F.silu(gate) * up
    else:
        y = F.gelu(y, approximate="tanh")
    return fc2.weight @ y + (fc2.bias if fc2.bias is not None else 0)


def naive_moe(x, layer, moe: MoEConfig, swiglu):
    """Outputs [T, h], the load-balancing loss and the z-loss, token by token."""
    E, k = moe.num_experts, moe.top_k
    router = layer.router.weight
    fc1, fc2 = layer.experts.fc1.weight, layer.experts.fc2.weight
    outputs, assigned = [], [0] * E
    prob_sums = [0.0] * E
    z_sum = 0.0
    for t in range(x.shape[0]):
        logits = router @ x[t]
        probs = torch.exp(logits - logits.max().detach())
        probs = probs / probs.sum()
        chosen = sorted(range(E), key=lambda e: -probs[e].item())[:k]
        norm = sum(probs[e] for e in chosen)
        y = sum(probs[e] / norm * naive_expert(x[t], fc1[e], fc2[e], swiglu) for e in chosen)
        if layer.shared is not None:
            y = y + naive_dense(x[t], layer.shared, swiglu)
        outputs.append(y)
        for e in chosen:
            assigned[e] += 1
        for e in range(E):
            prob_sums[e] = prob_sums[e] + probs[e]
        z_sum = z_sum + (logits.max() + torch.log(torch.exp(logits - logits.max()).sum())) ** 2
    T = x.shape[0]
    aux = moe.aux_loss_coef * E * sum(assigned[e] / (T * k) * prob_sums[e] / T for e in range(E))
    return torch.stack(outputs), aux, moe.z_loss_coef * z_sum / T, assigned


@pytest.mark.parametrize("style,shared", [("llama", 1), ("gpt", 2), ("gpt", 0)])
def test_layer_equals_the_naive_reference(style, shared):
    """Outputs, both losses and every gradient (input, router, experts, shared experts)."""
    torch.manual_seed(0)
    cfg = moe_config(style, shared)
    layer = build_layer(cfg)
    x = torch.randn(6, 3, 16, requires_grad=True)  # [s, b, h]
    probe = torch.randn(6, 3, 16)
    y = layer(x)
    (y * probe).sum().backward()  # the router's losses join through the layer (scale 1)
    got = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}
    x.grad = None
    layer.zero_grad()
    flat = x.reshape(18, 16)
    ref_y, aux, z, assigned = naive_moe(flat, layer, cfg.moe, style == "llama")
    torch.testing.assert_close(y.reshape(18, 16), ref_y, rtol=1e-5, atol=1e-6)
    sums = layer.step_sums
    torch.testing.assert_close(sums[:2], torch.stack([aux, z]).detach(), rtol=1e-5, atol=1e-7)
    assert sums[2:].tolist() == assigned and sum(assigned) == 18 * 2  # dropless: T k
    ((ref_y * probe.reshape(18, 16)).sum() + aux + z).backward()
    want = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    assert set(got) == set(want) and len(want) >= 4 + (2 if shared else 0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert aux.item() > 0 and z.item() > 0  # both losses are in play


@pytest.mark.parametrize("as_tensor", [False, True])  # fp16: a device scalar / m
def test_router_losses_get_the_main_loss_scale(as_tensor):
    """With scale S the layer's backward adds S * d(aux + z): the router's gradient is
    d(main) + S d(aux + z), checked against the two parts computed apart."""
    torch.manual_seed(1)
    cfg = moe_config("llama", shared=0, aux_loss_coef=1.0, z_loss_coef=0.1)
    layer = build_layer(cfg)
    x = torch.randn(4, 2, 16)
    probe = torch.randn(4, 2, 16)

    def router_grad(scale, with_main=True):
        layer.zero_grad()
        set_aux_loss_scale([layer], scale)
        y = layer(x)
        ((y * probe).sum() * with_main + 0 * y.sum()).backward()
        return layer.router.weight.grad.clone()

    main_only = router_grad(0.0)
    aux_only = router_grad(1.0, with_main=False)
    scale = torch.tensor(0.25) if as_tensor else 0.25
    torch.testing.assert_close(router_grad(scale), main_only + 0.25 * aux_only)
    assert aux_only.abs().max() > 1e-3  # the losses' gradient is not negligible here


def test_dispatch_is_dropless_and_grouped_by_expert():
    torch.manual_seed(2)
    tokens = torch.randn(10, 5)
    expert_ids = torch.stack([torch.randperm(6)[:3] for _ in range(10)])  # [T, k], distinct
    rows, route = dispatch(tokens, expert_ids, 6, None)
    assert route.rows_per_local_expert == torch.bincount(expert_ids.reshape(-1), minlength=6
                                                         ).tolist()
    assert rows.shape == (30, 5)  # every assignment, none dropped
    start = 0
    for e, n in enumerate(route.rows_per_local_expert):
        tokens_of_e = [t for t in range(10) if e in expert_ids[t].tolist()]
        torch.testing.assert_close(rows[start:start + n], tokens[tokens_of_e])
        start += n


def test_every_picks_the_moe_layers_and_params_are_described():
    cfg = moe_config("gpt", shared=1, every=2)
    cfg.num_layers = 4
    model = GPT(cfg)
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["ParallelMLP", "MoEMLP", "ParallelMLP", "MoEMLP"]
    info = {n: param_info(p) for n, p in model.named_parameters()}
    assert info["layers.1.mlp.experts.fc1.weight"].expert
    assert info["layers.1.mlp.experts.fc1.weight"].global_shape == (4, 24, 16)
    assert info["layers.1.mlp.experts.fc1.weight"].tp_split_dim == 1
    assert info["layers.3.mlp.experts.fc2.weight"].global_shape == (4, 16, 24)
    assert info["layers.3.mlp.experts.fc2.weight"].tp_split_dim == 2
    assert not info["layers.1.mlp.router.weight"].expert
    assert not info["layers.1.mlp.shared.fc1.weight"].expert
    assert info["layers.1.mlp.shared.fc1.weight"].global_shape == (24, 16)  # 1 x ffn_e
    assert "layers.1.mlp.shared.fc1.bias" in info and "layers.1.mlp.experts.fc1.bias" not in info
    padding = (model.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size
    assert sum(p.numel() for p in model.parameters()) - padding == cfg.num_parameters()
    per_expert = 2 * 16 * 24
    assert cfg.num_parameters() - cfg.num_parameters(active=True) == 2 * 2 * per_expert


@pytest.mark.parametrize("key,value", [("top_k", 5), ("num_experts", 0), ("every", 0),
                                       ("aux_loss_coef", -1.0)])
def test_bad_moe_values_name_their_key(key, value):
    with pytest.raises(ValueError, match=f"model.moe.{key}"):
        moe_config(**{key: value})


def test_unknown_moe_key_is_refused():
    with pytest.raises(ValueError, match="model.moe"):
        moe_config(capacity_factor=1.25)


def test_gpt_with_experts_trains():
    """A whole GPT with MoE layers learns a fixed batch in one process; the router's losses
    are counted once per training forward and not at all in evaluation."""
    torch.manual_seed(0)
    cfg = moe_config("llama", shared=0)
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 61, (4, 8))
    targets = torch.roll(tokens, -1, dims=1)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(tokens, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    layers = moe_layers([model])
    assert len(layers) == 2 and all(layer.micro_batches == 30 for layer in layers)
    assert all(layer.step_sums[2:].sum().item() == 30 * 32 * 2 for layer in layers)
    model.eval()
    with torch.no_grad():
        model(tokens, targets)
    assert all(layer.micro_batches == 30 for layer in layers)


@pytest.mark.parametrize("overrides,world_size,key", [
    (["model.moe.top_k=5"], 1, "model.moe.top_k"),
    (["model.moe.num_experts=0"], 1, "model.moe.num_experts"),
    (["model.moe.aux_loss_coef=-1"], 1, "model.moe.aux_loss_coef"),
    (["model.moe.shared_experts=-1"], 1, "model.moe.shared_experts"),
    (["+model.moe.capacity_factor=1.25"], 1, "model.moe"),
    (["model.moe.num_experts=6", "model.moe.top_k=2", "parallel.ep=4", "parallel.dp=4"], 4,
     "model.moe.num_experts"),
    (["model.moe.ffn_hidden_size=100", "parallel.tp=8", "model.num_heads=8"], 8,
     "model.moe.ffn_hidden_size"),
    (["model=tiny", "parallel.ep=2", "parallel.dp=2"], 2, "parallel.ep"),
])
def test_bad_config_is_one_error_naming_the_key(overrides, world_size, key):
    from nanomt.config import check_config
    from nanomt.errors import ConfigError
    from nanomt.testing import compose_config
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        check_config(compose_config(["model=moe_tiny", *overrides]), world_size=world_size)
    assert "\n" not in str(error.value)


def test_moe_tiny_preset_passes_the_checks_at_ep_2():
    from nanomt.config import check_config
    from nanomt.testing import compose_config
    model, layout, _ = check_config(compose_config(["model=moe_tiny", "parallel.ep=2",
                                                    "parallel.dp=4"]), world_size=4)
    assert model.moe.num_experts == 4 and layout.ep == 2
    assert model.num_parameters(active=True) < model.num_parameters()


def test_flops_count_the_active_parameters_as_torch_counts_the_matmuls():
    """What experts add to a step's FLOPs over the same model dense (4h MLP) equals 3 x the
    forward matmul FLOPs torch's counter sees: k experts, shared experts and router a token."""
    from torch.utils.flop_counter import FlopCounterMode

    from nanomt.flops import flops_per_iteration
    counted, formula = [], []
    for moe in (None, dict(num_experts=4, top_k=2, ffn_hidden_size=48, shared_experts=1)):
        cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=16,
                          vocab_size=128, moe=moe)
        model, tokens = GPT(cfg), torch.randint(0, 128, (3, 16))
        with FlopCounterMode(display=False) as counter:
            model(tokens, tokens)
        counted.append(3 * counter.get_total_flops())
        formula.append(flops_per_iteration(cfg, 3, padded_vocab=128))
    assert counted[1] != counted[0]
    assert formula[1] - formula[0] == counted[1] - counted[0]
