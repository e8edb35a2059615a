"""Convert public task files to nanomt.eval's local JSONL formats (docs/eval.md).

    python tools/convert_eval_tasks.py lambada    lambada_test.jsonl        lambada.jsonl
    python tools/convert_eval_tasks.py piqa       valid.jsonl piqa.jsonl --labels valid-labels.lst
    python tools/convert_eval_tasks.py hellaswag  hellaswag_val.jsonl       hellaswag.jsonl
    python tools/convert_eval_tasks.py winogrande dev.jsonl                 winogrande.jsonl

Nothing is downloaded: pass the files as their authors publish them. The prompts are those of
lm-evaluation-harness (lambada_openai, piqa, hellaswag), so zero-shot scores compare:

    lambada     {"text"}                           -> last word: context = all but the last word,
                                                      target = the last word
    piqa        {"goal", "sol1", "sol2"[, "label"]} -> "Question: <goal>\\nAnswer:", [sol1, sol2]
                (labels inside each line, or one per line in --labels)
    hellaswag   {"activity_label", "ctx_a", "ctx_b", "endings", "label"}
                                                   -> "<activity>: <ctx_a> <Ctx_b>", endings
                                                      (WikiHow "[title]" / "[step]" marks removed)
    winogrande  {"sentence" with "_", "option1", "option2", "answer": "1"|"2"}
                                                   -> context = the sentence before the blank,
                                                      choices = option + the rest of the sentence

WinoGrande here scores log p(option + rest | prefix), whose argmax is that of the whole
sentence's probability (the prefix is shared); lm-evaluation-harness instead scores
log p(rest | prefix + option) ("partial scoring"), which this one-context format cannot express,
so its WinoGrande accuracies differ from the harness's.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path


def lambada(row: dict) -> dict:
    context, _, target = row["text"].rpartition(" ")
    return {"context": context, "target": target}


def piqa(row: dict) -> dict:
    return {"context": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
            "answer": int(row["label"])}


def _clean_wikihow(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict) -> dict:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"context": _clean_wikihow(row["activity_label"] + ": " + context),
            "choices": [_clean_wikihow(ending) for ending in row["endings"]],
            "answer": int(row["label"])}


def winogrande(row: dict) -> dict:
    sentence = row["sentence"]
    blank = sentence.index("_")
    rest = sentence[blank + 1:]
    return {"context": sentence[:blank].rstrip(),
            "choices": [row["option1"] + rest, row["option2"] + rest],
            "answer": int(row["answer"]) - 1}


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "lambada": lambada, "piqa": piqa, "hellaswag": hellaswag, "winogrande": winogrande}


def read_rows(path: Path, labels: Path | None) -> Iterator[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if labels is not None:
        values = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
        if len(values) != len(rows):
            raise ValueError(f"--labels {labels} has {len(values)} labels for {len(rows)} rows")
        rows = [{**row, "label": value} for row, value in zip(rows, values)]
    yield from rows


def convert(task: str, source: Path, output: Path, labels: Path | None = None) -> int:
    """Write `output` in nanomt's format; returns the number of examples."""
    rows = [CONVERTERS[task](row) for row in read_rows(Path(source), labels)]
    Path(output).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=sorted(CONVERTERS))
    parser.add_argument("source", type=Path, help="the public JSONL file")
    parser.add_argument("output", type=Path, help="the nanomt JSONL file to write")
    parser.add_argument("--labels", type=Path, help="PIQA: the labels file (one per line)")
    args = parser.parse_args(argv)
    count = convert(args.task, args.source, args.output, args.labels)
    print(f"wrote {count} {args.task} examples to {args.output}")


if __name__ == "__main__":
    main()
