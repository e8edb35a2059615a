"""Generation (nanomt.eval.generation): the KV cache changes nothing but the cost, batched prompts
of different lengths equal each prompt alone, and the top-k / top-p cuts keep exactly the tokens
their definitions name."""

from __future__ import annotations

import pytest
import torch

from nanomt.data.tokenizer import ByteTokenizer
from nanomt.eval.generation import SamplingSettings, filter_logits, generate_tokens
from nanomt.eval.runner import ParallelLM
from nanomt.model import GPT, ModelConfig
from nanomt.model.kv_cache import KVCache


def random_lm(style: str) -> ParallelLM:
    """A model whose outputs depend strongly on the input (random, not-small weights)."""
    cfg = ModelConfig(style=style, num_layers=2, hidden_size=32, num_heads=4, seq_len=40,
                      vocab_size=256)
    model = GPT(cfg, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return ParallelLM([model], None, ByteTokenizer())


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [40]]
SETTINGS = [SamplingSettings(max_new_tokens=12, temperature=0),
            SamplingSettings(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=7)]


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_kv_cache_equals_recomputing_the_whole_sequence(style):
    lm = random_lm(style)
    tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    cache = KVCache()
    pieces = [lm.logits(tokens[:, a:b], cache) for a, b in ((0, 9), (9, 10), (10, 30))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), lm.logits(tokens), rtol=0, atol=1e-5)
    assert cache.length == 30 and cache.layers[1].keys.shape == (2, 4, 30, 8)
    for settings in SETTINGS:
        with_cache = generate_tokens(lm, PROMPTS, settings)
        settings.use_cache = False
        assert generate_tokens(lm, PROMPTS, settings) == with_cache
        assert [len(row) for row in with_cache] == [12, 12, 12]


def test_prompts_of_different_lengths_batch_like_each_alone():
    lm = random_lm("gpt")
    batched = generate_tokens(lm, PROMPTS, SETTINGS[0])
    assert batched == [generate_tokens(lm, [p], SETTINGS[0])[0] for p in PROMPTS]
    # the continuation really depends on the prompt (the comparison above can fail)
    assert len({tuple(row) for row in batched}) == 3


def test_top_k_and_top_p_keep_the_tokens_their_definitions_name():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda cut: torch.isfinite(cut)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2, top_p=1.0)) == [True, True, False, False]
    # smallest set of most likely tokens whose probability reaches top_p
    assert keep(filter_logits(logits, top_k=0, top_p=0.5)) == [True, False, False, False]
    assert keep(filter_logits(logits, top_k=0, top_p=0.79)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_k=0, top_p=0.81)) == [True, True, True, False]
    shuffled = logits[:, [2, 0, 3, 1]]  # the cut follows the values, not the positions
    assert keep(filter_logits(shuffled, top_k=0, top_p=0.79)) == [False, True, False, True]


def test_the_end_of_training_sample_keeps_its_prompt_and_fits_the_window():
    from nanomt.eval.generation import sample_after_training

    lm = random_lm("gpt")  # seq_len 40
    text = sample_after_training(lm.chunks, None, "byte", "ROMEO:", 64, 0.8, 1)
    assert text.encode("utf-8", errors="replace")[:6] == b"ROMEO:"
    assert all(chunk.training for chunk in lm.chunks)  # handed back in training mode
    greedy = [sample_after_training(lm.chunks, None, "byte", "ROMEO:", 64, 0.0, seed)
              for seed in (1, 2)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("ROMEO:")
    ids = ParallelLM(lm.chunks, None, ByteTokenizer()).tokenizer.encode("ROMEO:")
    new = generate_tokens(lm, [ids], SamplingSettings(max_new_tokens=40 - 6, temperature=0))[0]
    assert greedy[0] == ByteTokenizer().decode(ids + new)  # the whole window: 6 + 34 tokens


def _sample_and_scores(model, grid, task: str) -> dict:
    """The end-of-training sample (greedy and drawn) and the task scores of `model`."""
    from nanomt.eval.generation import sample_after_training
    from nanomt.eval.tasks import score_during_training

    return {"greedy": sample_after_training([model], grid, "byte", "ROMEO:", 16, 0.0, 1),
            "drawn": sample_after_training([model], grid, "byte", "ROMEO:", 16, 0.9, 1),
            "scores": score_during_training([model], grid, "byte", [task])}


def _assert_same_outputs(ours: dict, reference: dict) -> None:
    assert ours["greedy"] == reference["greedy"] is not None
    assert ours["greedy"].startswith("ROMEO:") and len(ours["greedy"]) > 6
    assert ours["drawn"] == reference["drawn"]
    assert ours["scores"].keys() == reference["scores"].keys()
    for key, value in reference["scores"].items():
        assert ours["scores"][key] == pytest.approx(value, rel=1e-5), key


def _multiple_choice_task(tmp_path) -> str:
    """Prompts of odd lengths, which neither SP nor cp could split."""
    import json

    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps(row) + "\n" for row in [
        {"context": "the quick brown", "choices": ["fox", "dog.", "cat"], "answer": 0},
        {"context": "ROMEO: wherefore", "choices": ["art", "is"], "answer": 0}]))
    return str(task)


def _sample_with_and_without_sp(task: str) -> dict:
    """tp=2: the same weights built with and without sequence parallelism give the same end of
    training sample (greedy and drawn) and the same task scores; SP is back on afterwards."""
    from nanomt.parallel.grid import ParallelGrid

    grid = ParallelGrid(tp=2, pp=1, dp=1)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=40, vocab_size=256)
    out = {}
    for sp in (False, True):
        model = GPT(cfg, grid, seed=3, sequence_parallel=sp)
        out[sp] = {**_sample_and_scores(model, grid, task),
                   "flags": sorted({m.sequence_parallel for m in model.modules()
                                    if hasattr(m, "sequence_parallel")})}
    return out


def test_sequence_parallel_runs_sample_as_the_same_model(tmp_path):
    from nanomt.testing import run_distributed

    for rank in run_distributed(_sample_with_and_without_sp, world_size=2,
                                args=(_multiple_choice_task(tmp_path),), timeout_s=120):
        _assert_same_outputs(rank[True], rank[False])
        assert rank[True]["flags"] == [True] and rank[False]["flags"] == [False]


def _sample_with_and_without_cp(task: str) -> dict:
    """cp=2: every cp rank holds the whole model, runs the end-of-training sample and the task
    scores on whole sequences and gets what the single-process model gets; its cp split is
    back afterwards."""
    from nanomt.parallel.grid import ParallelGrid

    grid = ParallelGrid(tp=1, pp=1, dp=1, cp=2)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=40, vocab_size=256)
    out = {}
    for name, model_grid in (("single", None), ("cp2", grid)):
        model = GPT(cfg, model_grid, seed=3)
        out[name] = {**_sample_and_scores(model, model_grid, task),
                     "cp": sorted({m.cp_size for m in model.modules() if hasattr(m, "cp_size")})}
    return out


def test_context_parallel_runs_sample_and_scores_on_whole_sequences(tmp_path):
    from nanomt.testing import run_distributed

    for rank in run_distributed(_sample_with_and_without_cp, world_size=2,
                                args=(_multiple_choice_task(tmp_path),), timeout_s=120):
        _assert_same_outputs(rank["cp2"], rank["single"])
        assert rank["cp2"]["cp"] == [2] and rank["single"]["cp"] == [1]
