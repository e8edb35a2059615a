"""`python -m nanomt.generate` and `python -m nanomt.eval` under tp=2 with sequence parallelism
and under cp=2 print what one process prints (greedy continuations token for token, task scores
to 1e-5); a training run under tp=2 + SP ends with its sample: the greedy continuation the
single process draws from the run's final checkpoint; a ZeRO-3 run at dp=2 scores its
train.eval_tasks (replicas with unequal shares) as the single process scores its checkpoint."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from nanomt.checkpoint import save_checkpoint
from nanomt.eval.cli import INFERENCE_CONF_DIR, run_eval, run_generate
from nanomt.model import GPT, ModelConfig
from nanomt.testing import compose_config, run_distributed

PROMPTS = "[ROMEO:,the quick brown,x]"  # lengths 6, 15 and 1: none splits over tp or 2*cp
LAYOUTS = {"tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
           "cp2": ["parallel.cp=2"]}
TRAIN = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_len=32",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=3",
         "train.eval_interval=0", "train.eval_batches=1", "train.progress_bar=false",
         "train.measure_memory=false", "optim.warmup_steps=1", "optim.lr=1e-2",
         "logging.wandb.mode=disabled", "train.sample_prompt=ROMEO:", "train.sample_tokens=12",
         "train.sample_temperature=0", "parallel.tp=2", "parallel.sequence_parallel=true"]


ZERO3 = ["parallel.dp=2", "parallel.zero_stage=3", "train.eval_interval=3", "train.sample=false"]
MC33 = [{"context": f"ROMEO: {word}", "choices": ["But", "soft", "what"], "answer": i % 3}
        for i, word in enumerate("But soft what light through yonder window breaks now".split()
                                 + ["ROMEO:", "light"])]  # 11 questions, 33 requests


def inference_config(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(INFERENCE_CONF_DIR), version_base="1.3"):
        quiet = ["logging.wandb.mode=disabled"] if name == "eval" else []
        return compose(config_name=name, overrides=[*quiet, *overrides])


def random_checkpoint(root: Path) -> Path:
    """A byte-level model with random, not-small weights: continuations depend on the prompt."""
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=40, vocab_size=256)
    model = GPT(cfg, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    meta = {"model": cfg.to_dict(), "config": {"data": {"tokenizer": "byte"}},
            "layout": {"tp": 1, "pp": 1, "dp": 1, "virtual_stages": 1,
                       "sequence_parallel": False, "zero_stage": 0}}
    save_checkpoint(root, 0, [model], None, None, meta, include_rng=False)
    return root


def generate_and_score(checkpoint: str, task: str, layout: list[str], run_dir: str) -> dict:
    """The two commands' results (and what rank 0 printed) under `layout`."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        texts = run_generate(inference_config(
            "generate", f"checkpoint={checkpoint}", f"prompt={PROMPTS}", "gen.temperature=0",
            "gen.max_new_tokens=16", *layout))
        scores = run_eval(inference_config(
            "eval", f"checkpoint={checkpoint}", "eval.perplexity=false", f"eval.tasks=[{task}]",
            "eval.batch_size=2", *layout), Path(run_dir))
    return {"texts": texts, "printed": printed.getvalue(),
            "lls": [e["loglikelihoods"] for e in scores["mc"]["examples"]]}


def harness_loglikelihoods(checkpoint: str, **layout) -> list[float]:
    """NanomtLM (the lm-eval model) built on `layout` from the checkpoint: two requests."""
    from lm_eval.api.instance import Instance

    from nanomt.eval.harness import NanomtLM

    requests = [Instance("loglikelihood", {}, ("the quick", " brown"), 0),
                Instance("loglikelihood", {}, ("", "ROMEO:"), 1)]
    return [ll for ll, _ in NanomtLM(checkpoint, **layout).loglikelihood(requests)]


def _every_layout(checkpoint: str, task: str, root: str) -> dict:
    from nanomt.train import run

    out = {name: generate_and_score(checkpoint, task, layout, f"{root}/{name}")
           for name, layout in LAYOUTS.items()}
    out["harness_cp2"] = harness_loglikelihoods(checkpoint, cp=2, sequence_parallel=False)
    data = [f"data.name={root}/text.txt", f"data.cache_dir={root}/cache"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run(compose_config(TRAIN + data + [f"checkpoint.dir={root}/ckpt"]), Path(root) / "train")
        # ZeRO-3 gathers the weights over both replicas in every forward: the 33 requests split
        # 17 / 16 must still run the same number of forwards (batches of 16) on each
        run(compose_config(TRAIN[:-2] + data + ZERO3 + [f"train.eval_tasks=[{root}/mc33.jsonl]",
                                                        f"checkpoint.dir={root}/ckpt_z3"]),
            Path(root) / "zero3")
    out["train_printed"] = printed.getvalue()
    return out


def test_generate_and_eval_under_sp_and_cp_equal_one_process(tmp_path):
    checkpoint = str(random_checkpoint(tmp_path / "ckpt"))
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps(row) + "\n" for row in [
        {"context": "the quick brown", "choices": ["fox", "dog.", "cat"], "answer": 0},
        {"context": "ROMEO: wherefore", "choices": ["art", "is"], "answer": 0},
        {"context": "x", "choices": ["y", "zz"], "answer": 1}]))
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "text.txt").write_text(  # 60 documents: train and valid splits
        "\n\n".join(["ROMEO: But soft, what light through yonder window breaks?"] * 60))
    (tmp_path / "ranks" / "mc33.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC33))
    single = generate_and_score(checkpoint, str(task), [], str(tmp_path / "single"))
    assert len(set(single["texts"])) == 3 and all(len(t) > 0 for t in single["texts"])
    ranks = run_distributed(_every_layout, world_size=2,
                            args=(checkpoint, str(task), str(tmp_path / "ranks")),
                            timeout_s=400)
    for rank in ranks:
        for name in LAYOUTS:
            assert rank[name]["texts"] == single["texts"], name
            for mine, ref in zip(rank[name]["lls"], single["lls"]):
                assert mine == pytest.approx(ref, rel=1e-5), name
    assert ranks[0]["tp2_sp"]["printed"].startswith(single["printed"].split("nanomt eval")[0])
    harness_single = harness_loglikelihoods(checkpoint)
    for rank in ranks:
        assert rank["harness_cp2"] == pytest.approx(harness_single, rel=1e-5)
    # the SP run's sample is the single process's greedy continuation of its final checkpoint
    sample = ranks[0]["train_printed"].split("nanomt sample:\n")[1].split("\n")[0]
    final = run_generate(inference_config(
        "generate", f"checkpoint={tmp_path / 'ranks' / 'ckpt'}", "prompt=ROMEO:",
        "gen.temperature=0", "gen.max_new_tokens=12"))[0]
    assert sample == "ROMEO:" + final and len(final) > 0
    # the ZeRO-3 run's task scores are the single process's on its final checkpoint
    record = json.loads((tmp_path / "ranks" / "zero3" / "metrics.jsonl").read_text()
                        .splitlines()[-1])
    after = run_eval(inference_config(
        "eval", f"checkpoint={tmp_path / 'ranks' / 'ckpt_z3'}", "eval.perplexity=false",
        f"eval.tasks=[{tmp_path / 'ranks' / 'mc33.jsonl'}]"), tmp_path / "after")["mc33"]
    assert record["mc33/acc"] == after["metrics"]["acc"]
    assert record["mc33/acc_norm"] == after["metrics"]["acc_norm"]
