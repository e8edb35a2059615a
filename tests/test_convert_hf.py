"""Hugging Face round trips: nanomt -> transformers (GPT-2, Llama) gives the same logits, and a
transformers model imported into nanomt gives the same logits, on one process and under tp=2.
Offline: models are built from configs with random weights."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from nanomt.checkpoint import load_checkpoint, save_checkpoint
from nanomt.model import GPT, ModelConfig
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.param_info import param_info
from nanomt.testing import run_distributed
from model_outputs import full_logits

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("convert_hf", ROOT / "tools" / "convert_hf.py")
convert_hf = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(convert_hf)

# vocab 100 padded to 128: the padding must vanish on export and reappear on import
CONFIGS = {
    "gpt": dict(style="gpt", num_layers=2, hidden_size=32, num_heads=4, seq_len=16,
                vocab_size=100),
    "gpt_untied": dict(style="gpt", num_layers=2, hidden_size=32, num_heads=4, seq_len=16,
                       vocab_size=100, tie_embeddings=False),
    "llama": dict(style="llama", num_layers=2, hidden_size=32, num_heads=4, seq_len=16,
                  vocab_size=100, ffn_hidden_size=48, rope_theta=500.0, norm_eps=1e-6),
}
TOKENS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
LAYOUT = {"tp": 1, "pp": 1, "dp": 1, "virtual_stages": 1, "sequence_parallel": False,
          "zero_stage": 0}


def random_nanomt_model(cfg: ModelConfig, grid=None) -> GPT:
    """A GPT whose every weight (norm gains and biases too) is random, the same at any tp."""
    model = GPT(cfg, grid, seed=7)
    full = GPT(cfg, None, seed=7) if grid is not None else model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name, param), (_, full_param) in zip(model.named_parameters(),
                                                  full.named_parameters()):
            noise = torch.randn(full_param.shape, generator=generator) * 0.05
            if name in ("word_embedding.weight", "output_layer.weight"):
                noise[cfg.vocab_size:] = 0  # padding rows stay zero
            full_param.add_(noise)
            if grid is not None:  # take my tp slice of the full noisy parameter
                dim = param_info(param).tp_split_dim
                value = full_param if dim is None else full_param.chunk(
                    grid.tp_size, dim=dim)[grid.tp_rank]
                param.copy_(value)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def hf_logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                              dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("style", ["gpt", "gpt_untied", "llama"])
def test_export_matches_transformers_logits(style, tmp_path):
    cfg = ModelConfig(**CONFIGS[style])
    model = random_nanomt_model(cfg)
    model.eval()
    save_checkpoint(tmp_path / "ckpt", 5, [model], None, None,
                    {"model": cfg.to_dict(), "layout": LAYOUT})
    convert_hf.main(["export", "--checkpoint", str(tmp_path / "ckpt"),
                     "--output", str(tmp_path / "hf")])
    config = (tmp_path / "hf" / "config.json").read_text()
    assert ("LlamaForCausalLM" if style == "llama" else "GPT2LMHeadModel") in config
    expected = full_logits(model, TOKENS)
    assert relative_error(hf_logits(tmp_path / "hf"), expected) < 1e-4


def _import_under_tp2(checkpoints: dict[str, str]) -> dict:
    grid = ParallelGrid(tp=2)
    out = {"tp_rank": grid.tp_rank}
    for style, path in checkpoints.items():
        cfg = ModelConfig(**CONFIGS[style])
        model = GPT(cfg, grid, seed=3)
        load_checkpoint(path, [model], None, grid, cfg.to_dict())
        model.eval()
        out[style] = full_logits(model, TOKENS)
        if style == "llama":  # this rank's shard of the fused [2, ffn, h] gate/up weight
            out["fc1_shard"] = model.layers[1].mlp.fc1.weight.detach().clone()
    return out


def test_import_matches_transformers_logits_on_one_process_and_tp2(tmp_path):
    torch.manual_seed(0)
    made = {
        "gpt": transformers.GPT2LMHeadModel(convert_hf.hf_config(ModelConfig(**CONFIGS["gpt"]))),
        "gpt_untied": transformers.GPT2LMHeadModel(
            convert_hf.hf_config(ModelConfig(**CONFIGS["gpt_untied"]))),
        "llama": transformers.LlamaForCausalLM(
            convert_hf.hf_config(ModelConfig(**CONFIGS["llama"]))),
    }
    expected, checkpoints = {}, {}
    for style, hf_model in made.items():
        with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise them too
            for param in hf_model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        hf_model.save_pretrained(str(tmp_path / f"hf_{style}"))
        expected[style] = hf_logits(tmp_path / f"hf_{style}")
        checkpoints[style] = str(tmp_path / f"nanomt_{style}")
        convert_hf.main(["import", "--input", str(tmp_path / f"hf_{style}"),
                         "--output", checkpoints[style]])
        cfg = ModelConfig(**CONFIGS[style])
        model = GPT(cfg, seed=3)
        load_checkpoint(checkpoints[style], [model], None, None, cfg.to_dict())
        model.eval()
        assert relative_error(full_logits(model, TOKENS), expected[style]) < 1e-4, style
    tp2 = run_distributed(_import_under_tp2, world_size=2, args=(checkpoints,), timeout_s=400)
    for style in made:
        for rank_logits in tp2:
            assert relative_error(rank_logits[style], expected[style]) < 1e-4, style
    # Under tp each rank holds its rows of gate_proj AND the same rows of up_proj.
    mlp, ffn = made["llama"].model.layers[1].mlp, CONFIGS["llama"]["ffn_hidden_size"]
    for rank in tp2:
        rows = slice(rank["tp_rank"] * ffn // 2, (rank["tp_rank"] + 1) * ffn // 2)
        gate, up = rank["fc1_shard"]
        assert torch.equal(gate, mlp.gate_proj.weight.detach()[rows])
        assert torch.equal(up, mlp.up_proj.weight.detach()[rows])


def test_import_refuses_a_non_empty_output_and_configs_nanomt_computes_differently(tmp_path):
    hf_dir = tmp_path / "hf"
    transformers.GPT2LMHeadModel(convert_hf.hf_config(ModelConfig(**CONFIGS["gpt"]))) \
        .save_pretrained(str(hf_dir))
    run_checkpoints = tmp_path / "run" / "checkpoints"
    run_checkpoints.mkdir(parents=True)
    (run_checkpoints / "latest").write_text("step_00000100\n")
    with pytest.raises(ValueError, match="not empty"):
        convert_hf.main(["import", "--input", str(hf_dir), "--output", str(run_checkpoints)])
    assert [p.name for p in run_checkpoints.iterdir()] == ["latest"]

    llama = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=8)
    assert convert_hf.model_config_from_hf(transformers.LlamaConfig(**llama)).num_heads == 4
    refused = {
        "num_key_value_heads=2": transformers.LlamaConfig(**{**llama, "num_key_value_heads": 2}),
        "head_dim=16": transformers.LlamaConfig(**{**llama, "head_dim": 16}),
        "hidden_act='gelu'": transformers.LlamaConfig(**{**llama, "hidden_act": "gelu"}),
        "rope_scaling 'linear'": transformers.LlamaConfig(
            **llama, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "scale_attn_by_inverse_layer_idx": transformers.GPT2Config(
            scale_attn_by_inverse_layer_idx=True),
        "reorder_and_upcast_attn": transformers.GPT2Config(reorder_and_upcast_attn=True),
    }
    for message, config in refused.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            convert_hf.model_config_from_hf(config)
