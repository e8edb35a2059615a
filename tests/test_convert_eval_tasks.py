"""tools/convert_eval_tasks.py on hand-written lines of each public format: the output is what
lm-evaluation-harness would ask the model, in nanomt.eval's format, and nanomt.eval reads it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from nanomt.eval.tasks import load_task

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("convert_eval_tasks",
                                              ROOT / "tools" / "convert_eval_tasks.py")
convert_eval_tasks = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(convert_eval_tasks)

PUBLIC = {
    "lambada": [{"text": "He handed her the key and said goodbye to Anna"}],
    "piqa": [{"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid."}],
    "hellaswag": [{"activity_label": "Baking cookies", "ctx_a": "A woman mixes dough.",
                   "ctx_b": "she", "ctx": "A woman mixes dough. she",
                   "endings": ["puts it in the oven. [step] Wait.", "throws it away."],
                   "label": "0", "split": "val", "ind": 4}],
    "winogrande": [{"qID": "1", "sentence": "The cup fell off the table because the _ was "
                    "wobbly.", "option1": "cup", "option2": "table", "answer": "2"}],
}
EXPECTED = {
    "lambada": {"context": "He handed her the key and said goodbye to", "target": "Anna"},
    "piqa": {"context": "Question: How do I open a jar?\nAnswer:",
             "choices": ["Twist the lid.", "Eat the lid."], "answer": 1},
    "hellaswag": {"context": "Baking cookies: A woman mixes dough. She",
                  "choices": ["puts it in the oven. Wait.", "throws it away."], "answer": 0},
    "winogrande": {"context": "The cup fell off the table because the",
                   "choices": ["cup was wobbly.", "table was wobbly."], "answer": 1},
}


def test_each_public_format_converts_to_what_the_harness_would_ask(tmp_path):
    for task, rows in PUBLIC.items():
        source = tmp_path / f"{task}_public.jsonl"
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
        argv = [task, str(source), str(tmp_path / f"{task}.jsonl")]
        if task == "piqa":  # PIQA publishes its labels in a separate file
            (tmp_path / "labels.lst").write_text("1\n")
            argv += ["--labels", str(tmp_path / "labels.lst")]
        convert_eval_tasks.main(argv)
        (converted,) = [json.loads(line) for line in
                        (tmp_path / f"{task}.jsonl").read_text().splitlines()]
        assert converted == EXPECTED[task], task
        loaded = load_task(str(tmp_path / f"{task}.jsonl"))
        assert loaded.kind == ("last_word" if task == "lambada" else "multiple_choice")
