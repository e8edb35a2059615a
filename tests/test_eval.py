"""Evaluation from checkpoints (nanomt.eval): every number against one computed independently
from the single-process model, and every layout against the single process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanomt.checkpoint import load_checkpoint
from nanomt.data.sampler import to_inputs_targets
from nanomt.errors import ConfigError
from nanomt.eval.cli import INFERENCE_CONF_DIR, run_eval
from nanomt.eval.generation import SamplingSettings, generate_tokens
from nanomt.eval.perplexity import dataset_loss, validation_stream
from nanomt.eval.runner import checkpoint_meta, load_parallel_lm
from nanomt.eval.scoring import encode_pair, rolling_windows
from nanomt.eval.tasks import PromptSettings, Task, evaluate_task, load_task, prompts
from nanomt.model import GPT, ModelConfig
from nanomt.parallel.grid import ParallelGrid
from nanomt.testing import run_distributed
from model_outputs import full_logits

# The fox model saw only "the quick brown fox jumps over the lazy dog." (tests/conftest.py).
MULTIPLE_CHOICE = [
    {"context": "the quick brown", "choices": ["fox", "dog.", "cat"], "answer": 0},
    {"context": "the quick brown fox jumps over the lazy", "choices": ["fox", "dog.", "cow."],
     "answer": 1},
    {"context": "the quick brown fox", "choices": ["sleeps", "jumps", "runs"], "answer": 1},
    {"context": "the quick brown fox jumps", "choices": ["under", "over", "onto"], "answer": 1},
]
LAST_WORD = [{"context": "the quick brown fox jumps over the lazy", "target": "dog."},
             {"context": "dog. the quick brown", "target": "fox"},
             {"context": "the quick brown fox jumps over the", "target": "cat"}]  # never seen


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def single_process_model(checkpoint: Path) -> GPT:
    meta = checkpoint_meta(checkpoint)
    cfg = ModelConfig.from_dict(meta["model"])
    model = GPT(cfg)
    load_checkpoint(meta["folder"], [model], None, None, cfg.to_dict())
    return model.eval()


def direct_loglikelihood(model: GPT, context: str, continuation: str) -> float:
    """sum of log p(token | prefix) over the continuation's bytes, from the model's logits."""
    ids = torch.tensor([list((context + continuation).encode())])
    log_probs = torch.log_softmax(full_logits(model, ids[:, :-1]), dim=-1)[0]
    first = len(context.encode())
    return float(sum(log_probs[i - 1, ids[0, i]] for i in range(first, ids.shape[1])))


def eval_config(checkpoint: Path, *overrides: str):
    """The config `python -m nanomt.eval checkpoint=... <overrides>` builds."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(INFERENCE_CONF_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=[f"checkpoint={checkpoint}",
                                                      "logging.wandb.mode=disabled", *overrides])


def test_perplexity_is_exp_of_the_mean_token_loss(fox_model, tmp_path, capsys):
    results = run_eval(eval_config(fox_model["checkpoint"], "eval.num_samples=8"), tmp_path)
    model = single_process_model(fox_model["checkpoint"])
    meta = checkpoint_meta(fox_model["checkpoint"])
    stream = validation_stream(meta["config"], None, model.cfg.seq_len, 8)
    inputs, targets = to_inputs_targets([stream[i] for i in range(8)])
    loss = F.cross_entropy(full_logits(model, inputs).flatten(0, 1), targets.flatten())
    got = results["validation"]["metrics"]
    assert got["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    # the same 8 validation samples the run's own end-of-run validation averaged
    assert got["loss"] == pytest.approx(fox_model["summary"]["val_loss"], rel=1e-5)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["validation"]["metrics"]["ppl"] == got["ppl"]
    table = capsys.readouterr().out
    assert "validation" in table and f"{got['ppl']:.4f}" in table


def test_multiple_choice_and_last_word_scores_equal_the_models_token_logprobs(fox_model,
                                                                               tmp_path):
    mc = write_jsonl(tmp_path / "fox_mc.jsonl", MULTIPLE_CHOICE)
    lw = write_jsonl(tmp_path / "fox_lw.jsonl", LAST_WORD)
    results = run_eval(eval_config(fox_model["checkpoint"], "eval.perplexity=false",
                                   f"eval.tasks=[{mc},{lw}]"), tmp_path)
    model = single_process_model(fox_model["checkpoint"])
    for example, got in zip(MULTIPLE_CHOICE, results["fox_mc"]["examples"]):
        expected = [direct_loglikelihood(model, example["context"], " " + c)
                    for c in example["choices"]]
        assert got["loglikelihoods"] == pytest.approx(expected, rel=1e-5)
    # the model was trained on the sentence: it picks every right answer, raw and normalised
    assert results["fox_mc"]["metrics"] == {"acc": 1.0, "acc_norm": 1.0}
    lls = [direct_loglikelihood(model, e["context"], " " + e["target"]) for e in LAST_WORD]
    assert [e["loglikelihood"] for e in results["fox_lw"]["examples"]] == pytest.approx(lls,
                                                                                        rel=1e-5)
    assert [e["is_greedy"] for e in results["fox_lw"]["examples"]] == [True, True, False]
    assert results["fox_lw"]["metrics"]["acc"] == pytest.approx(2 / 3)
    assert results["fox_lw"]["metrics"]["ppl"] == pytest.approx(math.exp(-sum(lls) / 3),
                                                                rel=1e-5)


def test_fewshot_prompts_are_seeded_shots_joined_by_the_delimiters():
    examples = [{"context": f"q{i}", "choices": [f"a{i}", "x"], "answer": 0} for i in range(6)]
    task = Task("t", "multiple_choice", examples)
    settings = PromptSettings(num_fewshot=2, seed=5, target_delimiter=" ",
                              fewshot_delimiter="\n\n")
    first = prompts(task, settings)
    assert first == prompts(task, settings)  # the seed fixes them
    assert first != prompts(task, PromptSettings(num_fewshot=2, seed=6))
    for i, prompt in enumerate(first):
        *shots, question = prompt.split("\n\n")
        assert question == f"q{i}" and len(shots) == 2
        for shot in shots:
            j = int(shot.split(" ")[0][1:])
            assert shot == f"q{j} a{j}" and j != i  # a solved example, never the question
    pool = [{"context": "p", "choices": ["s"], "answer": 0}]
    assert prompts(Task("t", "multiple_choice", examples[:1], pool),
                   PromptSettings(num_fewshot=1)) == ["p s\n\nq0"]
    with pytest.raises(ConfigError, match="eval.num_fewshot"):
        prompts(task, PromptSettings(num_fewshot=6))


def test_tokenization_and_rolling_windows_follow_the_harness():
    from nanomt.data.tokenizer import ByteTokenizer

    # trailing spaces of the context belong to the continuation
    assert encode_pair(ByteTokenizer(), "ab ", "c") == ([97, 98], [32, 99])
    windows = rolling_windows(list(range(10, 20)), prefix=0, seq_len=4)
    scored = [t for _, continuation in windows for t in continuation]
    assert scored == list(range(10, 20))  # every token exactly once
    for context, continuation in windows:
        assert len(context) + len(continuation) <= 4 + 1
    assert windows[-1] == ([15, 16, 17], [18, 19])  # the last window still has a full context


def test_pairs_split_at_the_contexts_own_encoding_and_empty_contexts_as_the_harness():
    from nanomt.data.tokenizer import ByteTokenizer, build_tokenizer

    pytest.importorskip("tokenizers")
    gpt2 = build_tokenizer("gpt2")
    # the whole ends in " book store" [262, 1492, 3650]; the context keeps its own " bo" (1489)
    # and the continuation is what follows its length in the whole
    assert encode_pair(gpt2, "I like the bo", "ok store") == ([40, 588, 262, 1489], [3650])
    byte = ByteTokenizer()
    assert encode_pair(byte, "", "ROMEO") == ([10], list(b"ROMEO"))  # the prefix token
    # a continuation starting with the prefix token: that token is the context, not scored
    assert encode_pair(byte, "", "\nROMEO") == ([10], list(b"ROMEO"))
    assert encode_pair(gpt2, "", "<|endoftext|> Hi") == ([50256], gpt2.encode(" Hi"))


def test_bad_task_files_and_missing_checkpoints_are_named(fox_model, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "x", "choices": ["a"]}])
    with pytest.raises(ConfigError, match="answer.*missing"):
        load_task(str(bad))
    with pytest.raises(ConfigError, match="eval.tasks"):
        load_task(str(tmp_path / "absent.jsonl"))
    with pytest.raises(ConfigError, match="checkpoint="):
        run_eval(eval_config(tmp_path / "nothing"), tmp_path)
    lm = load_parallel_lm(fox_model["checkpoint"], None)
    with pytest.raises(ConfigError, match="gen.max_new_tokens"):
        generate_tokens(lm, [[1, 2, 3]], SamplingSettings(max_new_tokens=48))


PROMPTS = ["the quick", "over the lazy dog. the", "t"]  # different lengths in one batch
# hot enough that the trained model's draws differ from its argmax
HOT = SamplingSettings(max_new_tokens=16, temperature=3.0, top_k=8, top_p=0.9, seed=3)


def _score_under_layouts(checkpoint: str, mc_path: str) -> dict:
    """Greedy and sampled generation, task scores and perplexity at tp=2, pp=2 and dp=2."""
    out = {}
    for name, (tp, pp, dp) in {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2)}.items():
        lm = load_parallel_lm(checkpoint, ParallelGrid(tp, pp, dp))
        ids = [lm.tokenizer.encode(p) for p in PROMPTS]
        stream = validation_stream(checkpoint_meta(checkpoint)["config"], None, lm.seq_len, 8)
        out[name] = {
            "greedy": generate_tokens(lm, ids, SamplingSettings(max_new_tokens=16,
                                                                 temperature=0)),
            "sampled": generate_tokens(lm, ids, HOT),
            "mc": evaluate_task(lm, load_task(mc_path), PromptSettings(), batch_size=2).examples,
            "loss": dataset_loss(lm, stream, 8, batch_size=3)["loss"]}
    return out


def test_every_layout_equals_the_single_process(fox_model, tmp_path):
    mc = str(write_jsonl(tmp_path / "fox_mc.jsonl", MULTIPLE_CHOICE))
    checkpoint = str(fox_model["checkpoint"])
    lm = load_parallel_lm(checkpoint, None)
    ids = [lm.tokenizer.encode(p) for p in PROMPTS]
    greedy = generate_tokens(lm, ids, SamplingSettings(max_new_tokens=16, temperature=0))
    sampled = generate_tokens(lm, ids, HOT)
    mc_ref = evaluate_task(lm, load_task(mc), PromptSettings()).examples
    stream = validation_stream(checkpoint_meta(checkpoint)["config"], None, lm.seq_len, 8)
    loss = dataset_loss(lm, stream, 8)["loss"]
    assert lm.tokenizer.decode(ids[0] + greedy[0]).startswith("the quick brown fox jumps")
    assert sampled != greedy  # the sampled comparison below compares draws, not argmaxes
    ranks = run_distributed(_score_under_layouts, world_size=2, args=(checkpoint, mc),
                            timeout_s=400)
    for rank in ranks:
        for name, got in rank.items():
            assert got["greedy"] == greedy, name  # token for token
            assert got["sampled"] == sampled, name
            for mine, ref in zip(got["mc"], mc_ref):
                assert mine["loglikelihoods"] == pytest.approx(ref["loglikelihoods"],
                                                               rel=1e-5), name
            assert got["loss"] == pytest.approx(loss, rel=1e-5), name


def test_training_ends_with_a_readable_sample(fox_model):
    assert "nanomt sample:\nthe quick brown fox jumps over" in fox_model["printed"]


def test_the_two_commands_print_text_and_a_table(fox_model, tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "WANDB_MODE": "disabled"}
    mc = write_jsonl(tmp_path / "fox_mc.jsonl", MULTIPLE_CHOICE)
    generated = subprocess.run(
        [sys.executable, "-m", "nanomt.generate", f"checkpoint={fox_model['checkpoint']}",
         "prompt=[the quick,over the]", "gen.max_new_tokens=20", "gen.temperature=0",
         f"hydra.run.dir={tmp_path / 'gen'}"], env=env, capture_output=True, text=True,
        timeout=300, check=True)
    first, second = [block for block in generated.stdout.split("\n\n") if block.strip()]
    assert first == "the quick brown fox jumps ove"  # the prompt and 20 greedy bytes
    assert second.startswith("over the") and len(second) == len("over the") + 20
    evaluated = subprocess.run(
        [sys.executable, "-m", "nanomt.eval", f"checkpoint={fox_model['checkpoint']}",
         f"eval.tasks=[{mc}]", "eval.num_fewshot=1", "eval.num_samples=8",
         f"hydra.run.dir={tmp_path / 'eval'}"], env=env, capture_output=True, text=True,
        timeout=300, check=True)
    assert "fox_mc" in evaluated.stdout and "validation" in evaluated.stdout
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["results"]["fox_mc"]["metrics"]["acc"] == 1.0
    assert saved["config"]["eval"]["num_fewshot"] == 1
    failed = subprocess.run([sys.executable, "-m", "nanomt.eval", "checkpoint=/no/such/dir",
                             f"hydra.run.dir={tmp_path / 'bad'}"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert failed.returncode == 2 and "checkpoint=/no/such/dir does not exist" in failed.stderr


def test_tasks_scored_during_training_equal_nanomt_eval_on_the_checkpoint(fox_model, tmp_path):
    last = json.loads((fox_model["root"] / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    task = str(fox_model["root"] / "fox_brown.jsonl")
    after = run_eval(eval_config(fox_model["checkpoint"], "eval.perplexity=false",
                                 f"eval.tasks=[{task}]"), tmp_path)
    assert last["fox_brown/acc"] == after["fox_brown"]["metrics"]["acc"] == 1.0
    assert last["fox_brown/acc_norm"] == after["fox_brown"]["metrics"]["acc_norm"]
    from nanomt.launch_checks import check_launch
    from nanomt.testing import compose_config

    with pytest.raises(ConfigError, match="train.eval_tasks"):
        check_launch(compose_config([f"train.eval_tasks=[{tmp_path / 'absent.jsonl'}]"]), 1)
