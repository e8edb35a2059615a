"""A nanomt checkpoint as an lm-evaluation-harness model: any harness task, any layout, no export.

    from nanomt.eval.harness import NanomtLM
    import lm_eval
    lm = NanomtLM("outputs/.../checkpoints", tp=2)        # under torchrun with 2 ranks
    results = lm_eval.simple_evaluate(model=lm, tasks=["my_local_task"], task_manager=...)

The harness asks three questions (lm_eval.api.model.LM), answered by nanomt.eval:

    loglikelihood(context, continuation)  -> (log p(continuation | context), is_greedy)
    loglikelihood_rolling(text)           -> log p(text), every token scored once
    generate_until(context, gen_kwargs)   -> greedy (or sampled) text up to (without) end-of-text
                                             and the first stop string, as the `hf` backend

Tokenization is lm-evaluation-harness's own convention (nanomt.eval.scoring), so a task gives the
same log-likelihoods here as through `python -m nanomt.eval`. Every rank runs the harness on every
request (the harness sees a world of one); inside, the dp x cp replicas split the requests and
tp/pp ranks share each forward (any layout: NanomtLM(path, tp=2, sequence_parallel=True, cp=2)).
Needs the `eval` extra (pip install 'nanomt[eval]').
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM

from nanomt.eval.generation import SamplingSettings, generate_tokens
from nanomt.eval.runner import ParallelLM, load_parallel_lm
from nanomt.eval.scoring import loglikelihoods, prefix_token, rolling_loglikelihoods
from nanomt.parallel.grid import ParallelGrid
from nanomt.parallel.launch import init_distributed


class NanomtLM(LM):
    """lm_eval.api.model.LM over a nanomt checkpoint (or an already loaded ParallelLM)."""

    def __init__(self, checkpoint: str | None = None, *, lm: ParallelLM | None = None,
                 tp: int = 1, pp: int = 1, cp: int = 1, sequence_parallel: bool = False,
                 virtual_stages: int = 1, batch_size: int = 16, max_gen_toks: int = 64,
                 device: str = "cpu", tokenizer: str | None = None):
        super().__init__()
        if lm is None:
            if checkpoint is None:
                raise ValueError("NanomtLM needs a checkpoint folder (or a loaded lm=)")
            _, world_size, _ = init_distributed()
            grid = (ParallelGrid(tp, pp, world_size // (tp * pp * cp), cp=cp)
                    if world_size > 1 else None)
            lm = load_parallel_lm(checkpoint, grid, virtual_stages, device, tokenizer,
                                  sequence_parallel=sequence_parallel)
        self.lm, self.batch_size, self.max_gen_toks = lm, int(batch_size), int(max_gen_toks)

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        scores = loglikelihoods(self.lm, [tuple(r.args) for r in requests], self.batch_size)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        return rolling_loglikelihoods(self.lm, [r.args[0] for r in requests], self.batch_size)

    def generate_until(self, requests: list) -> list[str]:
        return [self._generate(context, dict(kwargs)) for context, kwargs in
                (r.args for r in requests)]

    def _generate(self, context: str, kwargs: dict) -> str:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks)))
        max_new = min(max_new, self.lm.seq_len - 1)
        sampled = bool(kwargs.get("do_sample", False))
        settings = SamplingSettings(max_new_tokens=max_new,
                                    temperature=float(kwargs.get("temperature", 1.0)) if sampled
                                    else 0.0, top_k=int(kwargs.get("top_k", 0) or 0),
                                    top_p=float(kwargs.get("top_p", 1.0) or 1.0))
        tokenizer = self.lm.tokenizer
        prompt = tokenizer.encode(context)[-(self.lm.seq_len - max_new):]
        text = tokenizer.decode(generate_tokens(self.lm, [prompt], settings)[0])
        # as the hf backend: the end-of-text (prefix_token, an export's eos) is one more stop
        # string, and the text ends before the earliest one
        for stop in [*until, tokenizer.decode([prefix_token(tokenizer)])]:
            if stop:
                text = text.split(stop)[0]
        return text

    @property
    def device(self) -> torch.device:
        return self.lm.device
