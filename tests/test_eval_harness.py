"""nanomt's scores against real libraries: lm-evaluation-harness running a local YAML task through
nanomt.eval.harness.NanomtLM, and transformers scoring the checkpoint exported to Hugging Face."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from test_eval import LAST_WORD, MULTIPLE_CHOICE, eval_config, write_jsonl

from nanomt.eval.cli import run_eval
from nanomt.eval.runner import load_parallel_lm

ROOT = Path(__file__).resolve().parent.parent
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
"""
MC_YAML = """\
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
LW_YAML = """\
output_type: loglikelihood
doc_to_text: context
doc_to_target: "{{ ' ' + target }}"
metric_list:
  - metric: acc
  - metric: perplexity
"""


def test_lm_eval_harness_gives_the_same_loglikelihoods_and_accuracy(fox_model, tmp_path,
                                                                    monkeypatch):
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}.items():
        monkeypatch.setenv(name, value)
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from nanomt.eval.harness import NanomtLM

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc = write_jsonl(tmp_path / "fox_mc.jsonl", MULTIPLE_CHOICE)
    lw = write_jsonl(tmp_path / "fox_lw.jsonl", LAST_WORD)
    (tasks / "fox_mc.yaml").write_text(TASK_YAML.format(name="fox_mc", path=mc) + MC_YAML)
    (tasks / "fox_lw.yaml").write_text(TASK_YAML.format(name="fox_lw", path=lw) + LW_YAML)
    harness = lm_eval.simple_evaluate(model=NanomtLM(str(fox_model["checkpoint"])),
                                      tasks=["fox_mc", "fox_lw"], bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(tasks)))
    ours = run_eval(eval_config(fox_model["checkpoint"], "eval.perplexity=false",
                                f"eval.tasks=[{mc},{lw}]"), tmp_path)

    samples = sorted(harness["samples"]["fox_mc"], key=lambda s: s["doc_id"])
    for sample, example in zip(samples, ours["fox_mc"]["examples"]):
        assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx(
            example["loglikelihoods"], rel=1e-6)
    for metric in ("acc", "acc_norm"):
        assert harness["results"]["fox_mc"][f"{metric},none"] == ours["fox_mc"]["metrics"][metric]
    samples = sorted(harness["samples"]["fox_lw"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0][0] for s in samples] == pytest.approx(
        [e["loglikelihood"] for e in ours["fox_lw"]["examples"]], rel=1e-6)
    for metric in ("acc", "ppl"):
        name = "perplexity" if metric == "ppl" else metric
        assert harness["results"]["fox_lw"][f"{name},none"] == pytest.approx(
            ours["fox_lw"]["metrics"][metric], rel=1e-6)


def test_harness_rolling_loglikelihood_and_generate_until(fox_model):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from nanomt.eval.harness import NanomtLM

    lm = load_parallel_lm(fox_model["checkpoint"], None)
    harness = NanomtLM(lm=lm)
    text = " ".join(["the quick brown fox jumps over the lazy dog."] * 2)  # 89 tokens
    whole = [ord("\n")] + list(text.encode())  # byte tokenizer: "\n" conditions the first one

    def log_p(j: int, context_start: int) -> float:  # token j + 1 given whole[start: j + 1]
        logits = lm.logits(torch.tensor([whole[context_start:j + 1]]))
        return float(torch.log_softmax(logits, dim=-1)[0, -1, whole[j + 1]])

    # the harness's definition: predictions 0..47 see the text from its start; the last 41
    # predictions (88 - 47) see the 48 tokens before the last one: a full window
    direct = (sum(log_p(j, 0) for j in range(48)) +
              sum(log_p(j, 89 - 48) for j in range(48, 89)))
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    assert harness.loglikelihood_rolling([request]) == pytest.approx([direct], rel=1e-5)
    request = Instance("generate_until", {}, ("the quick", {"until": [" over"],
                                                            "max_gen_toks": 30}), 0)
    assert harness.generate_until([request]) == [" brown fox jumps"]


def test_hf_export_scored_by_transformers_gives_the_same_loglikelihoods(fox_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    spec = importlib.util.spec_from_file_location("convert_hf", ROOT / "tools" / "convert_hf.py")
    convert_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_hf)
    convert_hf.main(["export", "--checkpoint", str(fox_model["checkpoint"]),
                     "--output", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                           local_files_only=True,
                                                           dtype=torch.float32).eval()
    mc = write_jsonl(tmp_path / "fox_mc.jsonl", MULTIPLE_CHOICE)
    ours = run_eval(eval_config(fox_model["checkpoint"], "eval.perplexity=false",
                                f"eval.tasks=[{mc}]"), tmp_path)
    for example, scored in zip(MULTIPLE_CHOICE, ours["fox_mc"]["examples"]):
        for choice, ll in zip(example["choices"], scored["loglikelihoods"]):
            ids = torch.tensor([list((example["context"] + " " + choice).encode())])
            with torch.no_grad():
                log_probs = torch.log_softmax(hf(ids[:, :-1]).logits, dim=-1)[0]
            first = len(example["context"])
            expected = sum(float(log_probs[i - 1, ids[0, i]]) for i in range(first, ids.shape[1]))
            assert ll == pytest.approx(expected, rel=1e-5)
