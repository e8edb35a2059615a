"""The Hugging Face export's tokenizer (tools/convert_hf.py): transformers loads it from the folder
and gives nanomt's ids for the byte and GPT-2 tokenizers, with bos = eos = nanomt's prefix token;
a model whose vocabulary the tokenizer does not fit exports no tokenizer and no token ids."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nanomt.checkpoint import save_checkpoint
from nanomt.data.tokenizer import build_tokenizer
from nanomt.model import GPT, ModelConfig

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
TEXT = "ROMEO: But soft!\n\n  東京 café\tdef f(x):\n    return x<|endoftext|> end"


def convert_hf():
    spec = importlib.util.spec_from_file_location("convert_hf", ROOT / "tools" / "convert_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export(tmp_path: Path, tokenizer: str, vocab_size: int) -> Path:
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_heads=2, seq_len=16,
                      vocab_size=vocab_size)
    meta = {"model": cfg.to_dict(), "config": {"data": {"tokenizer": tokenizer}},
            "layout": {"tp": 1, "pp": 1, "dp": 1, "virtual_stages": 1,
                       "sequence_parallel": False, "zero_stage": 0}}
    save_checkpoint(tmp_path / "ckpt", 0, [GPT(cfg)], None, None, meta, include_rng=False)
    return convert_hf().export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")


@pytest.mark.parametrize("name,vocab_size,boundary", [("byte", 256, 10), ("gpt2", 50257, 50256)])
def test_exported_tokenizer_gives_nanomts_ids(name, vocab_size, boundary, tmp_path,
                                              monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = export(tmp_path, name, vocab_size)
    ours = build_tokenizer(name)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    text = TEXT if name == "gpt2" else TEXT.replace("<|endoftext|>", "")
    assert theirs.encode(text) == ours.encode(text)  # no special token added in front
    assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text)) == text
    assert theirs.bos_token_id == theirs.eos_token_id == boundary
    config = json.loads((folder / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == boundary
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation.get("eos_token_id") == boundary
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                              dtype=torch.float32)
    assert model.config.vocab_size == vocab_size


def test_a_vocabulary_the_tokenizer_does_not_fit_exports_no_ids(tmp_path, capsys):
    folder = export(tmp_path, "byte", 100)
    assert "exporting without a tokenizer" in capsys.readouterr().err
    config = json.loads((folder / "config.json").read_text())
    assert config.get("bos_token_id") is None and config.get("eos_token_id") is None
    assert not (folder / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        convert_hf().hf_config(ModelConfig(num_layers=1, hidden_size=16, num_heads=2,
                                           seq_len=16, vocab_size=100), 256)
