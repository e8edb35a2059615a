"""Zero-, one- and few-shot tasks over local JSONL files, scored as lm-evaluation-harness does.

Two formats, one JSON object a line (docs/eval.md):

    multiple choice  {"context": str, "choices": [str, ...], "answer": int}
        ll_j = log p(delimiter + choice_j | prompt)
        acc      = [argmax_j ll_j == answer]
        acc_norm = [argmax_j ll_j / len(choice_j) == answer]       (length in characters)
    last word        {"context": str, "target": str}                  (LAMBADA)
        acc = [the target is the greedy continuation, every token]
        ppl = exp(-mean over examples of log p(delimiter + target | prompt))

With k-shot (eval.num_fewshot = k) the prompt is k solved examples, then the question:

    prompt = shot_1 + F + ... + shot_k + F + context,   shot = context + D + answer text

with D = eval.target_delimiter (" ") and F = eval.fewshot_delimiter ("\\n\\n"). The shots come
from the task's `fewshot_path` if given, else from the same file without the example itself,
drawn by one random.Random(eval.seed) per task, in example order: the same prompts every run.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanomt.errors import ConfigError
from nanomt.eval.runner import ParallelLM
from nanomt.eval.scoring import loglikelihoods

MULTIPLE_CHOICE, LAST_WORD = "multiple_choice", "last_word"
KEYS = {MULTIPLE_CHOICE: {"context", "choices", "answer"}, LAST_WORD: {"context", "target"}}


@dataclass
class Task:
    name: str
    kind: str
    examples: list[dict]
    fewshot_pool: list[dict] | None = None  # None: shots from `examples`, never the example itself


@dataclass
class PromptSettings:
    num_fewshot: int = 0
    seed: int = 1234
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"


@dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict[str, float]
    examples: list[dict] = field(default_factory=list)  # per example: loglikelihoods, pred, ...


def read_jsonl(path: str | Path, key: str = "eval.tasks") -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist", f"fix the path in {key}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError as error:
        raise ConfigError(f"task file {path} is not JSON lines: {error}",
                          f"fix the file given in {key} (one JSON object a line)") from error


def kind_of(examples: list[dict], where: str) -> str:
    """The format all examples share, or a ConfigError naming the first that differs."""
    if not examples:
        raise ConfigError(f"task file {where} holds no examples", "fix eval.tasks")
    kind = MULTIPLE_CHOICE if "choices" in examples[0] else LAST_WORD
    for line, example in enumerate(examples, 1):
        missing = KEYS[kind] - set(example)
        if missing:
            raise ConfigError(f"{where} line {line}: a {kind} example needs keys "
                              f"{sorted(KEYS[kind])}, {sorted(missing)} missing",
                              "convert the file with tools/convert_eval_tasks.py")
        if kind == MULTIPLE_CHOICE and not 0 <= example["answer"] < len(example["choices"]):
            raise ConfigError(f"{where} line {line}: answer {example['answer']} is not an "
                              f"index of its {len(example['choices'])} choices", "fix the file")
    return kind


def load_task(spec: str | dict[str, Any], key: str = "eval.tasks") -> Task:
    """An eval.tasks entry (`key` names the list in messages): a JSONL path, or {path, name
    (default: file stem), fewshot_path}."""
    spec = {"path": spec} if isinstance(spec, str) else dict(spec)
    if "path" not in spec:
        raise ConfigError(f"{key} entry {spec} has no path", "give each task a path")
    examples = read_jsonl(spec["path"], key)
    kind = kind_of(examples, spec["path"])
    pool = None
    if spec.get("fewshot_path"):
        pool = read_jsonl(spec["fewshot_path"], key)
        if kind_of(pool, spec["fewshot_path"]) != kind:
            raise ConfigError(f"few-shot file {spec['fewshot_path']} is not {kind}",
                              "point fewshot_path at examples of the same format")
    return Task(spec.get("name") or Path(spec["path"]).stem, kind, examples, pool)


def answer_text(example: dict, kind: str) -> str:
    return example["choices"][example["answer"]] if kind == MULTIPLE_CHOICE else example["target"]


def prompts(task: Task, settings: PromptSettings) -> list[str]:
    """Each example's prompt: k solved shots (if any), then its context."""
    k = settings.num_fewshot
    pool_size = len(task.fewshot_pool) if task.fewshot_pool is not None else len(task.examples) - 1
    if k > pool_size:
        raise ConfigError(f"eval.num_fewshot={k} but task {task.name} has only {pool_size} "
                          f"examples to draw shots from", "lower eval.num_fewshot")
    rng = random.Random(settings.seed)
    out = []
    for index, example in enumerate(task.examples):
        if task.fewshot_pool is not None:
            shots = rng.sample(task.fewshot_pool, k)
        else:
            others = [j for j in range(len(task.examples)) if j != index]
            shots = [task.examples[j] for j in rng.sample(others, k)]
        rendered = [shot["context"] + settings.target_delimiter + answer_text(shot, task.kind)
                    for shot in shots]
        out.append(settings.fewshot_delimiter.join(rendered + [example["context"]]))
    return out


def first_argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))


def score_multiple_choice(lm: ParallelLM, task: Task, settings: PromptSettings,
                          batch_size: int) -> TaskResult:
    requests, owners = [], []
    for index, (prompt, example) in enumerate(zip(prompts(task, settings), task.examples)):
        for choice in example["choices"]:
            requests.append((prompt, settings.target_delimiter + choice))
            owners.append(index)
    scores = loglikelihoods(lm, requests, batch_size)
    per_example = []
    for index, example in enumerate(task.examples):
        lls = [s.logprob for s, owner in zip(scores, owners) if owner == index]
        pred = first_argmax(lls)
        pred_norm = first_argmax([ll / len(c) for ll, c in zip(lls, example["choices"])])
        per_example.append({"loglikelihoods": lls, "pred": pred, "pred_norm": pred_norm,
                            "answer": example["answer"]})
    n = len(per_example)
    metrics = {"acc": sum(e["pred"] == e["answer"] for e in per_example) / n,
               "acc_norm": sum(e["pred_norm"] == e["answer"] for e in per_example) / n}
    return TaskResult(task.name, task.kind, metrics, per_example)


def score_last_word(lm: ParallelLM, task: Task, settings: PromptSettings,
                    batch_size: int) -> TaskResult:
    requests = [(prompt, settings.target_delimiter + example["target"])
                for prompt, example in zip(prompts(task, settings), task.examples)]
    scores = loglikelihoods(lm, requests, batch_size)
    per_example = [{"loglikelihood": s.logprob, "is_greedy": s.is_greedy} for s in scores]
    n = len(scores)
    metrics = {"acc": sum(s.is_greedy for s in scores) / n,
               "ppl": math.exp(-sum(s.logprob for s in scores) / n)}
    return TaskResult(task.name, task.kind, metrics, per_example)


def evaluate_task(lm: ParallelLM, task: Task, settings: PromptSettings,
                  batch_size: int = 16) -> TaskResult:
    """Score one task on every rank (collective over the model's ranks)."""
    if task.kind == MULTIPLE_CHOICE:
        return score_multiple_choice(lm, task, settings, batch_size)
    return score_last_word(lm, task, settings, batch_size)


def score_during_training(chunks: list, grid, tokenizer: str, specs: list) -> dict[str, float]:
    """train.eval_tasks on the weights as training holds them (zero-shot; every rank calls it;
    ParallelLM runs SP and cp on whole sequences):
    {"<task>/<metric>": value}, logged beside val_loss."""
    from nanomt.data.tokenizer import build_tokenizer

    lm = ParallelLM(chunks, grid, build_tokenizer(tokenizer))
    metrics = {}
    for spec in specs:
        result = evaluate_task(lm, load_task(spec), PromptSettings())
        metrics.update({f"{result.name}/{key}": value for key, value in result.metrics.items()})
    for chunk in chunks:
        chunk.train()
    return metrics
