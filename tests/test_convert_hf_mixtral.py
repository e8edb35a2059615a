"""Mixtral round trips (tools/convert_hf.py): a llama-style nanomt model with a mixture of
experts in every layer exports as MixtralForCausalLM with transformers' logits within 1e-5 and
the hub's tensor names on disk; a transformers Mixtral imports with its logits within 1e-5,
on one process and under tp = 2;
both round trips give back the same tensors bit for bit; the router picks and weighs the
experts as Mixtral's does (top-k of the softmax over all E, renormalised); what nanomt cannot
compute the same way is refused, naming the field. Offline: random weights from configs."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from nanomt.checkpoint import load_checkpoint, save_checkpoint
from nanomt.model import GPT, ModelConfig
from nanomt.testing import run_distributed
from model_outputs import full_logits

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("convert_hf", ROOT / "tools" / "convert_hf.py")
convert_hf = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(convert_hf)

E, K, FFN = 4, 2, 24
MIXTRAL = dict(style="llama", num_layers=2, hidden_size=32, num_heads=4, seq_len=16,
               vocab_size=100, ffn_hidden_size=FFN, rope_theta=500.0, norm_eps=1e-6,
               moe=dict(num_experts=E, top_k=K, ffn_hidden_size=FFN, aux_loss_coef=0.02,
                        z_loss_coef=0.0))
TOKENS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
LAYOUT = {"tp": 1, "pp": 1, "dp": 1, "virtual_stages": 1, "sequence_parallel": False,
          "zero_stage": 0}


def random_model(cfg: ModelConfig) -> GPT:
    """A GPT whose every weight, norm gains included, is random (padding rows stay zero)."""
    model = GPT(cfg, seed=7)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            if name in ("word_embedding.weight", "output_layer.weight"):
                noise[cfg.vocab_size:] = 0
            param.add_(noise)
    return model.eval()


def hf_logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(folder / "model.safetensors"))


def imported_model(checkpoint: Path) -> GPT:
    cfg = ModelConfig(**MIXTRAL)
    model = GPT(cfg, seed=3)
    load_checkpoint(checkpoint, [model], None, None, cfg.to_dict())
    return model.eval()


def test_export_matches_mixtral_logits_and_names_and_imports_back(tmp_path):
    cfg = ModelConfig(**MIXTRAL)
    model = random_model(cfg)
    save_checkpoint(tmp_path / "ckpt", 5, [model], None, None,
                    {"model": cfg.to_dict(), "layout": LAYOUT})
    convert_hf.main(["export", "--checkpoint", str(tmp_path / "ckpt"),
                     "--output", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"],
            config["intermediate_size"], config["router_aux_loss_coef"]) == (E, K, FFN, 0.02)
    # on disk, the hub's names: each expert's w1 (gate), w3 (up), w2 (down), the router "gate"
    disk, params = saved_tensors(tmp_path / "hf"), dict(model.named_parameters())
    for i in range(2):
        moe = f"model.layers.{i}.block_sparse_moe."
        assert torch.equal(disk[moe + "gate.weight"], params[f"layers.{i}.mlp.router.weight"])
        fc1 = params[f"layers.{i}.mlp.experts.fc1.weight"]
        fc2 = params[f"layers.{i}.mlp.experts.fc2.weight"]
        for e in range(E):
            assert torch.equal(disk[f"{moe}experts.{e}.w1.weight"], fc1[e, 0])
            assert torch.equal(disk[f"{moe}experts.{e}.w3.weight"], fc1[e, 1])
            assert torch.equal(disk[f"{moe}experts.{e}.w2.weight"], fc2[e])
    with torch.no_grad():
        expected = full_logits(model, TOKENS)
    assert (hf_logits(tmp_path / "hf") - expected).abs().max() < 1e-5

    # and back: nanomt -> Mixtral -> nanomt gives every tensor back, bit for bit
    convert_hf.main(["import", "--input", str(tmp_path / "hf"),
                     "--output", str(tmp_path / "back")])
    for name, param in imported_model(tmp_path / "back").named_parameters():
        assert torch.equal(param, params[name]), name


def _logits_under_tp2(checkpoint: str) -> torch.Tensor:
    from nanomt.parallel.grid import ParallelGrid

    cfg, grid = ModelConfig(**MIXTRAL), ParallelGrid(tp=2)
    model = GPT(cfg, grid, seed=3)
    load_checkpoint(checkpoint, [model], None, grid, cfg.to_dict())
    with torch.no_grad():
        return full_logits(model.eval(), TOKENS)


def test_import_matches_mixtral_logits_and_exports_back(tmp_path):
    torch.manual_seed(0)
    hf_model = transformers.MixtralForCausalLM(convert_hf.hf_config(ModelConfig(**MIXTRAL)))
    with torch.no_grad():  # norms start at 1: randomise everything
        for param in hf_model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    convert_hf.main(["import", "--input", str(tmp_path / "hf"), "--output",
                     str(tmp_path / "ckpt")])
    model = imported_model(tmp_path / "ckpt")
    with torch.no_grad():
        logits = full_logits(model, TOKENS)
    expected = hf_logits(tmp_path / "hf")
    assert (logits - expected).abs().max() < 1e-5
    # under tp = 2 each rank holds its f_e / 2 rows of every expert's gate AND up
    for rank_logits in run_distributed(_logits_under_tp2, world_size=2,
                                       args=(str(tmp_path / "ckpt"),), timeout_s=300):
        assert (rank_logits - expected).abs().max() < 1e-5

    # and back: Mixtral -> nanomt -> Mixtral writes the same files' tensors, bit for bit
    convert_hf.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--output",
                     str(tmp_path / "again"), "--tokenizer", "byte"])
    original, again = saved_tensors(tmp_path / "hf"), saved_tensors(tmp_path / "again")
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name


def test_the_router_is_mixtrals():
    """The same router weights and tokens: the same k experts in the same order, and the same
    weights (Mixtral: softmax over all E in fp32, top-k, divided by their sum)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = ModelConfig(**{**MIXTRAL, "moe": {**MIXTRAL["moe"], "num_experts": 8, "top_k": 3}})
    layer = random_model(cfg).layers[0].mlp
    reference = MixtralTopKRouter(convert_hf.hf_config(cfg))
    with torch.no_grad():
        reference.weight.copy_(layer.router.weight)
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
        weights, expert_ids, _ = layer.route(x)
        _, hf_weights, hf_ids = reference(x)
    assert torch.equal(expert_ids, hf_ids)
    assert torch.allclose(weights, hf_weights, rtol=0, atol=1e-7)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(64))


def test_what_nanomt_computes_differently_is_refused():
    mixtral = dict(vocab_size=100, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                   num_local_experts=4, num_experts_per_tok=2)
    cfg = convert_hf.model_config_from_hf(transformers.MixtralConfig(**mixtral))
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.ffn_hidden_size, cfg.moe.every,
            cfg.moe.shared_experts) == (4, 2, 24, 1, 0)
    refused = {
        "sliding_window=4096": dict(sliding_window=4096),
        "router_jitter_noise=0.1": dict(router_jitter_noise=0.1),
        "num_key_value_heads=2": dict(num_key_value_heads=2),
    }
    for message, change in refused.items():
        with pytest.raises(ValueError, match=message):
            convert_hf.model_config_from_hf(transformers.MixtralConfig(**{**mixtral, **change}))
    not_mixtral = {"every=2": dict(every=2), "shared_experts=1": dict(shared_experts=1)}
    for message, change in not_mixtral.items():
        cfg = ModelConfig(**{**MIXTRAL, "moe": {**MIXTRAL["moe"], **change}})
        with pytest.raises(ValueError, match=message):
            convert_hf.hf_config(cfg)
    with pytest.raises(ValueError, match="model.style=gpt"):
        convert_hf.hf_config(ModelConfig(**{**MIXTRAL, "style": "gpt"}))
