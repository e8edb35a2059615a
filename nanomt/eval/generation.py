"""Autoregressive generation: greedy, temperature, top-k and top-p (nucleus) sampling.

At each step the model gives logits z over the vocabulary for the next token, and

    greedy       x = argmax z                                        (temperature = 0)
    temperature  p = softmax(z / T)
    top-k        keep the k largest z, the others get p = 0
    top-p        keep the smallest set of most likely tokens whose p sums to >= top_p
    x ~ p        one draw from a torch.Generator seeded with gen.seed

With the KV cache (nanomt.model.kv_cache) the prompt runs once and every later step feeds only
the newest token; without it every step re-runs the whole sequence (the reference the cache is
tested against). Both give the same tokens.

Prompts of different lengths share one batch without padding: all rows run together from the
shortest prompt's end, and while a row is still inside its own prompt its next token is the
prompt's token, not a sample (teacher forcing). Every row then ends with max_new_tokens new
tokens (fewer if it produced the end-of-text token). Every rank of a model replica holds the
same logits (nanomt.eval.runner) and the same generator, so all draw the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanomt.errors import ConfigError
from nanomt.eval.runner import ParallelLM
from nanomt.eval.scoring import prefix_token
from nanomt.model.kv_cache import KVCache


@dataclass
class SamplingSettings:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0            # 0: no top-k cut
    top_p: float = 1.0        # 1: no nucleus cut
    seed: int = 1234
    use_cache: bool = True
    stop_at_eot: bool = True  # a row stops at the tokenizer's end-of-text token


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [b, V] with everything outside the top-k and the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_tokens(logits: torch.Tensor, settings: SamplingSettings,
                generator: torch.Generator) -> torch.Tensor:
    """One token per row from the last-position logits [b, V]."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(lm: ParallelLM, prompts: list[list[int]], settings: SamplingSettings
                    ) -> list[list[int]]:
    """The new tokens after each prompt (token ids); collective over the model's ranks."""
    prompts = [p or [prefix_token(lm.tokenizer)] for p in prompts]
    lengths = torch.tensor([len(p) for p in prompts])
    total = int(lengths.max()) + settings.max_new_tokens
    if total > lm.seq_len:
        raise ConfigError(f"the longest prompt ({int(lengths.max())} tokens) plus "
                          f"gen.max_new_tokens ({settings.max_new_tokens}) exceeds the model's "
                          f"window model.seq_len={lm.seq_len}",
                          "lower gen.max_new_tokens or shorten the prompt")
    tokens = torch.zeros(len(prompts), total, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt)
    generator = torch.Generator().manual_seed(settings.seed)
    cache = KVCache() if settings.use_cache else None
    eot = lm.tokenizer.eot_id if settings.stop_at_eot else None
    done = torch.zeros(len(prompts), dtype=torch.bool)
    position = int(lengths.min())
    logits = lm.logits(tokens[:, :position], cache)[:, -1].cpu()
    while position < total:
        sampled = next_tokens(logits, settings, generator)
        in_prompt = position < lengths
        chosen = torch.where(in_prompt, tokens[:, position], sampled)
        tokens[:, position] = chosen
        if eot is not None:
            done |= ~in_prompt & (chosen == eot)
        position += 1
        if position == total or bool(done.all()):
            break
        step = tokens[:, position - 1:position] if cache is not None else tokens[:, :position]
        logits = lm.logits(step, cache)[:, -1].cpu()
    return [_new_tokens(tokens[row, length:position].tolist(), settings.max_new_tokens, eot)
            for row, length in enumerate(lengths.tolist())]


def _new_tokens(tokens: list[int], max_new: int, eot: int | None) -> list[int]:
    tokens = tokens[:max_new]
    return tokens[:tokens.index(eot) + 1] if eot is not None and eot in tokens else tokens


def generate_text(lm: ParallelLM, prompts: list[str], settings: SamplingSettings) -> list[str]:
    """Continuations of text prompts."""
    new = generate_tokens(lm, [lm.tokenizer.encode(p) for p in prompts], settings)
    return [lm.tokenizer.decode(ids) for ids in new]


def sample_after_training(chunks: list, grid, tokenizer: str, prompt: str,
                          max_new_tokens: int, temperature: float, seed: int) -> str:
    """The end-of-run sample (train.sample): from the final weights as they are held, under the
    run's layout (every rank calls it; ParallelLM runs SP and cp on whole sequences); top-k 40
    when sampling."""
    from nanomt.data.tokenizer import build_tokenizer

    lm = ParallelLM(chunks, grid, build_tokenizer(tokenizer))
    prompt_ids = lm.tokenizer.encode(prompt)[-(lm.seq_len - 1):]  # room for one new token
    settings = SamplingSettings(max_new_tokens=min(max_new_tokens, lm.seq_len - len(prompt_ids)),
                                temperature=temperature, top_k=40, seed=seed)
    new = generate_tokens(lm, [prompt_ids], settings)[0]
    for chunk in chunks:
        chunk.train()
    return lm.tokenizer.decode(prompt_ids + new)
