"""lm-evaluation-harness scores a nanomt checkpoint (nanomt.eval.harness.NanomtLM) and the same
model exported to Hugging Face (tools/convert_hf.py, lm-eval's `hf` backend) request by request
alike, with the byte and the GPT-2 BPE tokenizer, over local JSONL tasks that cover the cases
where tokenizing context and continuation can go wrong: multiple choice 0- and 2-shot (contexts
ending in a space), last word, a continuation that starts inside a word or without a space (the
BPE seam), an empty context (also one whose continuation starts with the prefix token), rolling
log-likelihood over several windows, and generation up to a stop string.

The hf side runs with logits_cache=False: lm-eval 0.4.13's logits cache gives a shorter
continuation of a shared prefix the wrong positions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nanomt.checkpoint import save_checkpoint
from nanomt.model import GPT, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

MULTIPLE_CHOICE = [
    {"context": "Question: which animal barks? Answer: ", "choices": ["dog", "cat", "cow"],
     "answer": 0},
    {"context": "Question: 2 + 2 =", "choices": ["4", "five", "22"], "answer": 0},
    {"context": "the quick brown", "choices": ["fox", "dog.", "cat"], "answer": 0},
    {"context": "Q: colour of the sky?\nA:", "choices": ["blue", "green"], "answer": 0},
]
SEAM = [  # no delimiter: the continuation may start inside the context's last word
    {"context": "I like the bo", "target": "ok store"},
    {"context": "def add(a, b):\n    return a", "target": " + b"},
    {"context": "东京是日本的首", "target": "都。"},
    {"context": "the quick brown fo", "target": "x jumps"},
    {"context": "Hello wor", "target": "ld!"},
]
EMPTY = [  # an empty context; the first continuation starts with "\n" (the byte prefix token)
    {"context": "", "target": "\nROMEO: But soft"},
    {"context": "", "target": "<|endoftext|>Hello"},  # GPT-2's prefix token, as text
    {"context": "", "target": "the lazy dog"},
]
ROLLING = [{"text": "the quick brown fox jumps over the lazy dog. " * 4},
           {"text": "ROMEO: But soft, what light through yonder window breaks?\n" * 3},
           {"text": "short"}]
UNTIL = [{"context": "the quick brown", "target": ""}, {"context": "ROMEO:", "target": ""},
         {"context": "Hello", "target": ""}]

TASK = "task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n" \
       "test_split: test\nfewshot_split: test\n"
YAML = {
    "mc0": "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\n"
           "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "lw": "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: "
          "\"{{' ' + choices[answer]}}\"\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
          "  - metric: perplexity\n",
    "seam": "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: target\n"
            "target_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: perplexity\n",
    "rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
               "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    "gen": "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: target\n"
           "generation_kwargs:\n  until: [\".\", \"\\n\\n\"]\n  max_gen_toks: 12\n"
           "  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
}
YAML["mc2"] = YAML["mc0"] + "num_fewshot: 2\n"
YAML["empty"] = YAML["seam"]
ROWS = {"mc0": MULTIPLE_CHOICE, "mc2": MULTIPLE_CHOICE, "lw": MULTIPLE_CHOICE, "seam": SEAM,
        "empty": EMPTY, "rolling": ROLLING, "gen": UNTIL}


def tiny_checkpoint(root: Path, tokenizer: str, vocab_size: int) -> Path:
    """A random 2-layer GPT (weights made large enough that scores depend on every token) saved
    as a nanomt checkpoint whose run used `tokenizer`."""
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, seq_len=32,
                      vocab_size=vocab_size)
    model = GPT(cfg, seed=5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    meta = {"model": cfg.to_dict(), "config": {"data": {"tokenizer": tokenizer}},
            "layout": {"tp": 1, "pp": 1, "dp": 1, "virtual_stages": 1,
                       "sequence_parallel": False, "zero_stage": 0}}
    save_checkpoint(root, 0, [model], None, None, meta, include_rng=False)
    return root


def export(checkpoint: Path, output: Path) -> Path:
    spec = importlib.util.spec_from_file_location("convert_hf", ROOT / "tools" / "convert_hf.py")
    convert_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_hf)
    return convert_hf.export_checkpoint(checkpoint, output)


def write_tasks(folder: Path, prefix: str) -> list[str]:
    folder.mkdir()
    names = []
    for kind, rows in ROWS.items():
        name = f"{prefix}_{kind}"
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{name}.yaml").write_text(TASK.format(name=name, path=data) + YAML[kind])
        names.append(name)
    return names


def responses(results: dict, task: str) -> list:
    """Every request's answer, in document order (each document's requests in order)."""
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [resp for sample in samples for resp in sample["resps"]]


def assert_same_scores(ours: dict, hf: dict, task: str) -> int:
    """Every log-likelihood within 1e-4 relative, the same greedy flags, generations and
    accuracies; returns the number of requests compared."""
    mine, theirs = responses(ours, task), responses(hf, task)
    assert len(mine) == len(theirs) > 0, task
    for a, b in zip(mine, theirs):
        a, b = a[0], b[0]
        if isinstance(a, str):  # generate_until
            assert a == b, task
        elif isinstance(a, (list, tuple)):  # loglikelihood: (logprob, is_greedy)
            assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-4), task
            assert bool(a[1]) == bool(b[1]), task
        else:  # loglikelihood_rolling
            assert float(a) == pytest.approx(float(b), rel=1e-4), task
    for metric, value in ours["results"][task].items():
        if metric.startswith(("acc", "exact_match")) and "stderr" not in metric:
            assert value == hf["results"][task][metric], (task, metric)
    return len(mine)


@pytest.mark.parametrize("tokenizer,vocab_size", [("byte", 256), ("gpt2", 50257)])
def test_nanomt_and_its_hf_export_score_alike_in_lm_eval(tokenizer, vocab_size, tmp_path,
                                                         monkeypatch):
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}.items():
        monkeypatch.setenv(name, value)
    from lm_eval.tasks import TaskManager

    from nanomt.eval.harness import NanomtLM
    from nanomt.eval.runner import load_parallel_lm

    checkpoint = tiny_checkpoint(tmp_path / "ckpt", tokenizer, vocab_size)
    hf_dir = export(checkpoint, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == (10 if tokenizer == "byte"
                                                                 else 50256)
    names = write_tasks(tmp_path / "tasks", tokenizer)
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    common = {"tasks": names, "task_manager": manager, "bootstrap_iters": 0,
              "log_samples": True, "random_seed": 0, "fewshot_random_seed": 1234}
    ours = lm_eval.simple_evaluate(model=NanomtLM(lm=load_parallel_lm(checkpoint, None),
                                                  batch_size=4), **common)
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32,"
                                 "logits_cache=False", batch_size=1, device="cpu", **common)
    compared = {name: assert_same_scores(ours, hf, name) for name in names}
    # the cases are there: 3 choices a question (2 in the last), 2-shot prompts, several windows
    assert compared[f"{tokenizer}_mc2"] == 11 and compared[f"{tokenizer}_empty"] == 3
    assert "\n\n" in hf["samples"][f"{tokenizer}_mc2"][0]["arguments"][0][0]


def test_generate_until_ends_before_end_of_text_and_the_earliest_stop(tmp_path, monkeypatch):
    """As the hf backend: generation stops at the end-of-text token (an export's eos) and at the
    stop strings, and the text returned holds neither."""
    from lm_eval.api.instance import Instance

    import nanomt.eval.harness as harness
    from nanomt.eval.runner import load_parallel_lm

    lm = load_parallel_lm(tiny_checkpoint(tmp_path / "ckpt", "gpt2", 50257), None)
    gpt2 = lm.tokenizer
    drawn = gpt2.encode(" be be. or not") + [50256] + gpt2.encode(" to be")
    monkeypatch.setattr(harness, "generate_tokens", lambda *args: [list(drawn)])
    model = harness.NanomtLM(lm=lm)

    def generate(until: list[str]) -> str:
        request = Instance("generate_until", {}, ("To", {"until": until, "max_gen_toks": 8}), 0)
        return model.generate_until([request])[0]

    assert generate([]) == " be be. or not"
    assert generate(["not", "."]) == " be be"
    assert generate([" to"]) == " be be. or not"  # past the end-of-text: never reached
