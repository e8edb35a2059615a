"""Convert nanomt checkpoints to and from Hugging Face transformers folders.

    python tools/convert_hf.py export --checkpoint CKPT_DIR --output HF_DIR
    python tools/convert_hf.py import --input HF_DIR --output CKPT_DIR

style=gpt   <-> GPT2LMHeadModel   learned positions, LayerNorm, GeLU (tanh: "gelu_new"), tied
                                  embeddings. GPT-2's Conv1D stores weights as [in, out], so
                                  every linear is transposed; its fused c_attn columns are
                                  [q_all | k_all | v_all] while nanomt's fused QKV rows are per
                                  head [head0: q k v | head1: q k v | ...] (so tp splits heads).
style=llama <-> LlamaForCausalLM  RoPE (both use the rotate-half convention: no permutation),
                                  RMSNorm, SwiGLU whose fused fc1 [2, ffn, h] is
                                  [gate_proj; up_proj] (tp splits dim 1: each rank holds
                                  matching gate and up rows), fc2 = down_proj; untied lm_head.
style=llama <-> MixtralForCausalLM  the same, every MLP a mixture of experts (model.moe, every
  + moe                           = 1, no shared experts): router = gate, each expert's
                                  SwiGLU as above, the experts stacked: fc1 [E, 2, f_e, h] =
                                  [w1 (gate); w3 (up)] per expert, fc2 [E, h, f_e] = w2. Its
                                  router (softmax over all E, top-k, renormalised) is
                                  nanomt's, so the logits agree (docs/moe.md).

The export also writes the run's tokenizer (data.tokenizer, or --tokenizer) as a transformers
tokenizer with nanomt's ids: GPT-2 BPE and tokenizer.json files as they are, the byte tokenizer as
a byte-level BPE without merges (id = byte). Its bos and eos, and config.json's bos_token_id and
eos_token_id, are nanomt's prefix token (nanomt.eval.scoring.prefix_token: end-of-text, or the
newline byte), so lm-eval's `hf` backend loads the folder as is and conditions empty contexts and
stops generations on the token nanomt does. (The byte export's special token is the byte-level
character of "\n", U+010A: a literal U+010A in a text encodes to it there, to two bytes here.)

A checkpoint of any layout exports (its tensors are stored layout-independently); an import is
a single-shard checkpoint at step 0 without optimizer state, which any layout can load
(`train.resume=CKPT_DIR` starts training from it with fresh Adam moments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanomt.checkpoint import CheckpointReader, resolve_checkpoint, save_checkpoint  # noqa: E402
from nanomt.checkpoint.state import weight_key  # noqa: E402
from nanomt.data.tokenizer import Tokenizer  # noqa: E402
from nanomt.eval.runner import checkpoint_tokenizer  # noqa: E402
from nanomt.eval.scoring import prefix_token  # noqa: E402
from nanomt.model import GPT, ModelConfig  # noqa: E402

if TYPE_CHECKING:
    from tokenizers import Tokenizer as TokenizersBackend
    from transformers import PretrainedConfig, PreTrainedTokenizerFast


# ---- the fused QKV layout -----------------------------------------------------------------------
def split_qkv(weight: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """nanomt's per-head [3h(, h)] -> (q, k, v), each [h(, h)] in head order."""
    rest = weight.shape[1:]
    per_head = weight.reshape(num_heads, 3, -1, *rest)
    return tuple(per_head[:, j].reshape(-1, *rest) for j in range(3))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(q, k, v) each [h(, h)] -> nanomt's per-head [3h(, h)]."""
    rest = q.shape[1:]
    stacked = torch.stack([t.reshape(num_heads, -1, *rest) for t in (q, k, v)], dim=1)
    return stacked.reshape(-1, *rest)


# ---- name maps: (nanomt name, hf name, transpose) per layer ------------------------------------
def gpt2_layer_map(i: int) -> list[tuple[str, str, bool]]:
    n, h = f"layers.{i}.", f"transformer.h.{i}."
    return [(n + "norm1.weight", h + "ln_1.weight", False),
            (n + "norm1.bias", h + "ln_1.bias", False),
            (n + "attention.proj.weight", h + "attn.c_proj.weight", True),
            (n + "attention.proj.bias", h + "attn.c_proj.bias", False),
            (n + "norm2.weight", h + "ln_2.weight", False),
            (n + "norm2.bias", h + "ln_2.bias", False),
            (n + "mlp.fc1.weight", h + "mlp.c_fc.weight", True),
            (n + "mlp.fc1.bias", h + "mlp.c_fc.bias", False),
            (n + "mlp.fc2.weight", h + "mlp.c_proj.weight", True),
            (n + "mlp.fc2.bias", h + "mlp.c_proj.bias", False)]


def llama_layer_map(i: int) -> list[tuple[str, str, bool]]:
    n, h = f"layers.{i}.", f"model.layers.{i}."
    return [(n + "norm1.weight", h + "input_layernorm.weight", False),
            (n + "attention.proj.weight", h + "self_attn.o_proj.weight", False),
            (n + "norm2.weight", h + "post_attention_layernorm.weight", False),
            (n + "mlp.fc2.weight", h + "mlp.down_proj.weight", False)]


def mixtral_layer_map(i: int) -> list[tuple[str, str, bool]]:
    """transformers (5 and later) holds a Mixtral layer's experts stacked in memory,
    experts.gate_up_proj [E, 2 f_e, h] = [w1; w3] per expert and experts.down_proj
    [E, h, f_e] = w2, and saves (and loads) them per expert as the hub's files name them,
    block_sparse_moe.experts.{e}.w1 / w3 / w2 and block_sparse_moe.gate."""
    n, h = f"layers.{i}.", f"model.layers.{i}."
    return llama_layer_map(i)[:3] + [
        (n + "mlp.router.weight", h + "mlp.gate.weight", False),
        (n + "mlp.experts.fc2.weight", h + "mlp.experts.down_proj", False)]


def name_map(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """Every tensor except the fused QKV (and llama's fused gate/up), as (nanomt name, HF name,
    transposed)."""
    if cfg.style == "gpt":
        pairs = [("word_embedding.weight", "transformer.wte.weight", False),
                 ("position_embedding", "transformer.wpe.weight", False),
                 ("final_norm.weight", "transformer.ln_f.weight", False),
                 ("final_norm.bias", "transformer.ln_f.bias", False)]
        layer_map = gpt2_layer_map
    else:
        pairs = [("word_embedding.weight", "model.embed_tokens.weight", False),
                 ("final_norm.weight", "model.norm.weight", False)]
        layer_map = mixtral_layer_map if cfg.moe else llama_layer_map
    if not cfg.tie_embeddings:
        pairs.append(("output_layer.weight", "lm_head.weight", False))
    for i in range(cfg.num_layers):
        pairs += layer_map(i)
    return pairs


def to_hf_state(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf = {hf_name: (tensors[name].t() if transpose else tensors[name]).contiguous()
          for name, hf_name, transpose in name_map(cfg)}
    for i in range(cfg.num_layers):
        weight = tensors[f"layers.{i}.attention.qkv.weight"]
        q, k, v = split_qkv(weight, cfg.num_heads)
        if cfg.style == "gpt":
            prefix = f"transformer.h.{i}.attn.c_attn."
            hf[prefix + "weight"] = torch.cat([q, k, v]).t().contiguous()
            bias = split_qkv(tensors[f"layers.{i}.attention.qkv.bias"], cfg.num_heads)
            hf[prefix + "bias"] = torch.cat(bias).contiguous()
        else:
            prefix = f"model.layers.{i}.self_attn."
            for part, tensor in zip("qkv", (q, k, v)):
                hf[f"{prefix}{part}_proj.weight"] = tensor.contiguous()
            if cfg.moe:  # [E, 2, f_e, h] -> [E, 2 f_e, h]: each expert's gate rows, then up
                fc1 = tensors[f"layers.{i}.mlp.experts.fc1.weight"]
                hf[f"model.layers.{i}.mlp.experts.gate_up_proj"] = fc1.flatten(1, 2).contiguous()
                continue
            gate, up = tensors[f"layers.{i}.mlp.fc1.weight"]  # [2, ffn, h] = [gate; up]
            hf[f"model.layers.{i}.mlp.gate_proj.weight"] = gate.contiguous()
            hf[f"model.layers.{i}.mlp.up_proj.weight"] = up.contiguous()
    return hf


def from_hf_state(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {name: (hf[hf_name].t() if transpose else hf[hf_name]).contiguous()
               for name, hf_name, transpose in name_map(cfg)}
    h = cfg.hidden_size
    for i in range(cfg.num_layers):
        if cfg.style == "gpt":
            prefix = f"transformer.h.{i}.attn.c_attn."
            q, k, v = hf[prefix + "weight"].t().split(h)
            tensors[f"layers.{i}.attention.qkv.bias"] = fuse_qkv(*hf[prefix + "bias"].split(h),
                                                                 cfg.num_heads)
        else:
            prefix = f"model.layers.{i}.self_attn."
            q, k, v = (hf[f"{prefix}{part}_proj.weight"] for part in "qkv")
            mlp = f"model.layers.{i}.mlp."
            if cfg.moe:
                experts, ffn = cfg.moe.num_experts, cfg.moe.ffn_hidden_size
                tensors[f"layers.{i}.mlp.experts.fc1.weight"] = hf[
                    mlp + "experts.gate_up_proj"].reshape(experts, 2, ffn, h).contiguous()
            else:
                tensors[f"layers.{i}.mlp.fc1.weight"] = torch.stack(
                    [hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]])
        tensors[f"layers.{i}.attention.qkv.weight"] = fuse_qkv(q, k, v, cfg.num_heads)
    return tensors


# ---- configs ------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, boundary_id: int | None = None) -> PretrainedConfig:
    """The transformers config of `cfg`; bos and eos are `boundary_id` (None: none), never an id
    outside the vocabulary."""
    from transformers import GPT2Config, LlamaConfig

    if boundary_id is not None and not 0 <= boundary_id < cfg.vocab_size:
        raise ValueError(f"token id {boundary_id} is outside the model's vocabulary "
                         f"(model.vocab_size={cfg.vocab_size}): export with its own tokenizer")
    ids = {"bos_token_id": boundary_id, "eos_token_id": boundary_id}
    shared = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                  hidden_act="silu", **ids)
    if cfg.moe:
        return mixtral_config(cfg, shared)
    if cfg.style == "gpt":
        return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.seq_len,
                          n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                          n_inner=cfg.ffn_hidden_size,
                          activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          tie_word_embeddings=cfg.tie_embeddings,
                          architectures=["GPT2LMHeadModel"], **ids)
    return LlamaConfig(**shared, intermediate_size=cfg.ffn_hidden_size, attention_bias=False,
                       mlp_bias=False, architectures=["LlamaForCausalLM"])


def mixtral_config(cfg: ModelConfig, shared: dict) -> PretrainedConfig:
    """MixtralConfig of a llama-style MoE model: every layer an MoE, no shared experts."""
    from transformers import MixtralConfig

    moe = cfg.moe
    if cfg.style != "llama" or moe.every != 1 or moe.shared_experts:
        raise ValueError(f"model.style={cfg.style}, model.moe.every={moe.every}, "
                         f"model.moe.shared_experts={moe.shared_experts}: only style=llama with "
                         f"every=1 and no shared experts exports (as MixtralForCausalLM)")
    return MixtralConfig(**shared, intermediate_size=moe.ffn_hidden_size,
                         num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                         router_aux_loss_coef=moe.aux_loss_coef, router_jitter_noise=0.0,
                         sliding_window=None, architectures=["MixtralForCausalLM"])


def _gpt2_model_config(config: PretrainedConfig) -> ModelConfig:
    activation = getattr(config, "activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation_function={activation!r}: nanomt's GeLU is the tanh "
                         f"approximation (gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(config, flag, False):
            raise ValueError(f"GPT-2 with {flag}=true is not supported by nanomt (its "
                             f"attention scales scores by 1/sqrt(head_dim) only)")
    if not getattr(config, "scale_attn_weights", True):
        raise ValueError("GPT-2 with scale_attn_weights=false is not supported by nanomt")
    return ModelConfig(style="gpt", num_layers=config.n_layer, hidden_size=config.n_embd,
                       num_heads=config.n_head, ffn_hidden_size=config.n_inner,
                       seq_len=config.n_positions, vocab_size=config.vocab_size,
                       norm_eps=config.layer_norm_epsilon,
                       tie_embeddings=bool(config.tie_word_embeddings))


def _llama_rope_theta(config: PretrainedConfig) -> float:
    """RoPE's base; scaled variants (linear, dynamic, yarn, llama3, ...) are refused."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
    if kind != "default" or rope:
        raise ValueError(f"Llama rope_scaling {kind!r} {rope}: only unscaled (default) RoPE is "
                         f"supported by nanomt")
    return float(theta)


def _llama_model_config(config: PretrainedConfig) -> ModelConfig:
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if kv_heads != heads:
        raise ValueError(f"Llama num_key_value_heads={kv_heads} != num_attention_heads={heads}: "
                         f"grouped-query attention is not supported by nanomt")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(f"Llama head_dim={head_dim} != hidden_size/num_attention_heads="
                         f"{hidden}/{heads}: nanomt's heads split the hidden size")
    if config.hidden_act != "silu":
        raise ValueError(f"Llama hidden_act={config.hidden_act!r}: nanomt's SwiGLU uses silu")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("Llama with attention_bias/mlp_bias is not supported by nanomt")
    return ModelConfig(style="llama", num_layers=config.num_hidden_layers, hidden_size=hidden,
                       num_heads=heads, ffn_hidden_size=config.intermediate_size,
                       seq_len=config.max_position_embeddings, vocab_size=config.vocab_size,
                       norm_eps=config.rms_norm_eps, rope_theta=_llama_rope_theta(config),
                       tie_embeddings=bool(config.tie_word_embeddings))


def _mixtral_model_config(config: PretrainedConfig) -> ModelConfig:
    """Mixtral is Llama (the same checks) with a mixture of experts in every layer."""
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(f"Mixtral sliding_window={config.sliding_window}: nanomt's attention "
                         f"is causal over the whole sequence")
    if getattr(config, "router_jitter_noise", 0.0):
        raise ValueError(f"Mixtral router_jitter_noise={config.router_jitter_noise}: nanomt's "
                         f"router has no jitter")
    moe = {"num_experts": config.num_local_experts, "top_k": config.num_experts_per_tok,
           "ffn_hidden_size": config.intermediate_size, "every": 1, "shared_experts": 0,
           "aux_loss_coef": config.router_aux_loss_coef}
    return ModelConfig.from_dict({**_llama_model_config(config).to_dict(), "moe": moe})


def model_config_from_hf(config: PretrainedConfig) -> ModelConfig:
    """A transformers config (AutoConfig) -> nanomt's; anything nanomt computes differently is
    refused with the field to blame."""
    if config.model_type == "gpt2":
        return _gpt2_model_config(config)
    if config.model_type == "llama":
        return _llama_model_config(config)
    if config.model_type == "mixtral":
        return _mixtral_model_config(config)
    raise ValueError(f"model_type {config.model_type!r}: only gpt2, llama and mixtral folders "
                     f"can be imported")


# ---- the tokenizer ------------------------------------------------------------------------------
def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte (index = byte): printable Latin-1 bytes stand
    for themselves, the others for 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    stand_in = {b: chr(b) for b in printable} | {b: chr(256 + j) for j, b in enumerate(others)}
    return [stand_in[b] for b in range(256)]


def byte_tokenizer_backend() -> TokenizersBackend:
    """nanomt's byte tokenizer as a `tokenizers.Tokenizer`: byte-level BPE with no merges, so a
    text's ids are its UTF-8 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(byte_level_alphabet())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """`tokenizer` as a transformers tokenizer with the same ids, bos = eos = its prefix token."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend if hasattr(tokenizer, "backend") else byte_tokenizer_backend()
    probe = "a\nb é"  # a tokenizer that is not its backend alone (none in nanomt) is refused
    if backend.encode(probe, add_special_tokens=False).ids != tokenizer.encode(probe):
        raise ValueError(f"tokenizer {tokenizer.name} cannot be exported: its ids differ")
    boundary = AddedToken(backend.id_to_token(prefix_token(tokenizer)), special=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=boundary,
                                   eos_token=boundary)


# ---- the two commands ---------------------------------------------------------------------------
def export_checkpoint(checkpoint: str | Path, output: str | Path, tokenizer: str | None = None
                      ) -> Path:
    """nanomt checkpoint (any layout) -> Hugging Face folder (config.json, model.safetensors and
    the tokenizer: the run's data.tokenizer unless `tokenizer` names one; none if it has more
    ids than the model)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM

    reader = CheckpointReader(resolve_checkpoint(checkpoint))
    cfg = ModelConfig.from_dict(reader.meta["model"])
    text_tokenizer = checkpoint_tokenizer(reader.meta, tokenizer)
    if text_tokenizer.vocab_size > cfg.vocab_size:  # not the model's: no tokenizer, no ids
        print(f"convert_hf: tokenizer {text_tokenizer.name} has {text_tokenizer.vocab_size} ids, "
              f"more than model.vocab_size={cfg.vocab_size}: exporting without a tokenizer "
              f"(pass --tokenizer to name the model's)", file=sys.stderr)
        text_tokenizer = None
    tensors = {name: reader.full(weight_key(reader, name)).float() for name in
               (key.split("/", 1)[1] for key in reader.pieces if key.startswith("model/"))}
    model_class = (GPT2LMHeadModel if cfg.style == "gpt" else
                   MixtralForCausalLM if cfg.moe else LlamaForCausalLM)
    boundary = None if text_tokenizer is None else prefix_token(text_tokenizer)
    model = model_class(hf_config(cfg, boundary))
    missing, unexpected = model.load_state_dict(to_hf_state(cfg, tensors), strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight names disagree: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.tie_weights()
    model.save_pretrained(str(output), safe_serialization=True)
    if text_tokenizer is not None:
        hf_tokenizer(text_tokenizer).save_pretrained(str(output))
    return Path(output)


def import_checkpoint(hf_dir: str | Path, output: str | Path) -> Path:
    """Hugging Face GPT-2 / Llama / Mixtral folder -> nanomt checkpoint (step 0, no optimizer
    state)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {output} is not empty: importing there could overwrite a "
                         f"run's checkpoints; pass a new folder")
    cfg = model_config_from_hf(AutoConfig.from_pretrained(str(hf_dir), local_files_only=True))
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True,
                                                    dtype=torch.float32)
    tensors = from_hf_state(cfg, hf_model.state_dict())
    model = GPT(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = tensors[name]
            param.zero_()  # padding rows of the vocabulary stay zero
            param[tuple(slice(0, n) for n in value.shape)] = value
    meta = {"model": cfg.to_dict(), "source": str(hf_dir),
            "layout": {"tp": 1, "pp": 1, "dp": 1, "virtual_stages": 1,
                       "sequence_parallel": False, "zero_stage": 0}}
    return save_checkpoint(output, 0, [model], None, None, meta, include_rng=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="nanomt checkpoint -> Hugging Face folder")
    export.add_argument("--checkpoint", required=True, help="a step folder or checkpoint root")
    export.add_argument("--output", required=True)
    export.add_argument("--tokenizer", default=None,
                        help="byte | gpt2 | a tokenizer.json (default: the run's data.tokenizer)")
    imp = commands.add_parser("import", help="Hugging Face folder -> nanomt checkpoint")
    imp.add_argument("--input", required=True)
    imp.add_argument("--output", required=True, help="checkpoint root to create")
    args = parser.parse_args(argv)
    if args.command == "export":
        print(f"exported to {export_checkpoint(args.checkpoint, args.output, args.tokenizer)}")
    else:
        print(f"imported to {import_checkpoint(args.input, args.output)}")


if __name__ == "__main__":
    main()
