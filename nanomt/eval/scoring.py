"""Log-likelihood of a continuation given a context: the quantity every zero/few-shot task scores.

    log p(continuation | context) = sum_{i in continuation} log p(x_i | x_<i)

Context and continuation are tokenized as lm-evaluation-harness's `hf` backend does for causal
models (`encode_pair`), so the two agree token for token:

    trailing spaces of the context move to the front of the continuation
    context ids      = encode(context)
    continuation ids = encode(context + continuation)[len(context ids):]

The context keeps its own encoding even where the whole's tokens differ at the seam ("the bo" +
"ok": the context ends in " bo", the continuation starts after its length in the whole). An empty
context becomes the prefix token (end-of-text, or a newline for tokenizers without one), unless
the continuation itself starts with that token: then its first token is the context and is not
scored. A sequence longer than the model's window keeps its last seq_len + 1 tokens (the
continuation is always scored).

`is_greedy`: every continuation token is the argmax of the model's distribution at its position,
i.e. greedy decoding from the context would produce the continuation exactly (LAMBADA's accuracy).

Requests are batched (right-padded: a causal model's earlier positions never see the padding) and
split over data-parallel replicas; every rank gets every result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanomt.data.tokenizer import Tokenizer
from nanomt.eval.runner import ParallelLM


@dataclass
class Score:
    """One request's result: log p(continuation | context) and whether greedy decoding gives it."""

    logprob: float
    is_greedy: bool


def prefix_token(tokenizer: Tokenizer) -> int:
    """The boundary of a text: the end-of-text token, or a newline for tokenizers without one
    (the byte tokenizer). It conditions the first token of a text with no context, ends a
    harness generation, and a Hugging Face export names it bos and eos (tools/convert_hf.py), so
    lm-eval's hf backend conditions and stops on the same token."""
    return tokenizer.eot_id if tokenizer.eot_id is not None else tokenizer.encode("\n")[0]


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split as lm-evaluation-harness's `hf` backend splits them:
    the one encoding behind `python -m nanomt.eval` and nanomt.eval.harness.NanomtLM."""
    if not context:
        continuation_ids = tokenizer.encode(continuation)
        prefix = prefix_token(tokenizer)
        if continuation_ids[:1] == [prefix]:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids):]


def _window(context: list[int], continuation: list[int], seq_len: int
            ) -> tuple[list[int], int]:
    """Model input (the pair minus its last token, at most seq_len) and the number of scored
    positions at its end."""
    if not continuation:
        raise ValueError("a continuation must have at least one token")
    whole = (context + continuation)[-(seq_len + 1):]
    return whole[:-1], min(len(continuation), len(whole) - 1)


@torch.no_grad()
def score_batch(lm: ParallelLM, pairs: list[tuple[list[int], list[int]]]) -> list[Score]:
    """Score token-id pairs in one forward (every rank of the replica must call it)."""
    windows = [_window(ctx, cont, lm.seq_len) for ctx, cont in pairs]
    width = max(len(inputs) for inputs, _ in windows)
    batch = torch.zeros(len(pairs), width, dtype=torch.long)
    for row, (inputs, _) in enumerate(windows):
        batch[row, :len(inputs)] = torch.tensor(inputs)
    log_probs = lm.log_probs(batch).cpu()
    scores = []
    for row, ((inputs, n), (_, cont)) in enumerate(zip(windows, pairs)):
        positions = torch.arange(len(inputs) - n, len(inputs))
        targets = torch.tensor(cont[-n:])
        values = log_probs[row, positions, targets]
        greedy = bool((log_probs[row, positions].argmax(dim=-1) == targets).all())
        scores.append(Score(float(values.sum()), greedy))
    return scores


def score_pairs(lm: ParallelLM, pairs: list[tuple[list[int], list[int]]],
                batch_size: int = 16) -> list[Score]:
    """Score many pairs: this replica's share in batches, then every replica's results."""
    mine = lm.shard(pairs)
    scores: list[Score] = []
    for b in range(lm.batch_count(len(pairs), batch_size)):
        batch = mine[b * batch_size:(b + 1) * batch_size]
        scored = score_batch(lm, batch or pairs[:1])  # past my share: a stand-in, dropped
        scores += scored if batch else []
    return lm.unshard(scores, len(pairs))


def loglikelihoods(lm: ParallelLM, requests: list[tuple[str, str]], batch_size: int = 16
                   ) -> list[Score]:
    """log p(continuation | context) for (context, continuation) strings."""
    pairs = [encode_pair(lm.tokenizer, context, continuation) for context, continuation in requests]
    return score_pairs(lm, pairs, batch_size)


def rolling_windows(tokens: list[int], prefix: int, seq_len: int
                    ) -> list[tuple[list[int], list[int]]]:
    """A long text as (context, continuation) pairs that score each token exactly once:
    predictions in runs of seq_len, each run with as much context as the window holds (so the
    last run, usually short, still sees a full window)."""
    whole = [prefix] + tokens  # tokens[j] = whole[j + 1] is predicted from whole[: j + 1]
    pairs = []
    for first in range(0, len(tokens), seq_len):
        end = min(first + seq_len, len(tokens))
        context_start = max(0, end - seq_len)
        pairs.append((whole[context_start:first + 1], whole[first + 1:end + 1]))
    return pairs


def rolling_loglikelihoods(lm: ParallelLM, texts: list[str], batch_size: int = 16
                           ) -> list[float]:
    """log p(text) of whole texts (conditioned on the prefix token), each token scored once."""
    prefix = prefix_token(lm.tokenizer)
    pairs, owner = [], []
    for i, text in enumerate(texts):
        for pair in rolling_windows(lm.tokenizer.encode(text), prefix, lm.seq_len):
            pairs.append(pair)
            owner.append(i)
    totals = [0.0] * len(texts)
    for i, score in zip(owner, score_pairs(lm, pairs, batch_size)):
        totals[i] += score.logprob
    return totals
