"""Benchmark (not a test): throughput of the curation tools on a generated corpus.

    python tools/bench/bench_curation.py [--docs 100000] [--workers 1 2] [--dir bench_curation]
        [--steps dedup decontaminate filter_quality] [--repeat 1]
    (default dir: $TMPDIR/nanomt_bench_curation)

Generates `--docs` documents of 100 to 500 words (nanomt.curation.synthetic: sentences over a
20,000-word random vocabulary and stop words), of which 10% are near-duplicates of earlier ones
(3% of words changed), 2% exact copies with other case and spacing and 1% carry a 13-gram of an
evaluation set of 5,000 examples. Each step then runs as its own process (tools/*.py) once per
worker count; the table gives what each reports in OUT.summary.json: documents/s and MB/s of
input (timed from reading the input to the end of writing: worker start-up included, the
interpreter's not), the CPU seconds of the main process and its workers, the machine's load
average (other jobs share the CPUs: docs per CPU second is the figure they disturb least),
what it removed (decontaminate: documents changed, and removed whole), and the peak resident
memory of the main process and of the largest worker. With `--repeat N` each run is repeated
and the fastest kept (on shared machines the slower ones measure the other jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nanomt.curation.synthetic import (document, near_duplicate, respace, sentence,  # noqa: E402
                                       vocabulary)


def generate(folder: Path, num_docs: int, seed: int = 0) -> tuple[Path, Path]:
    """corpus.jsonl and eval.jsonl in `folder` (reused when already there with this size)."""
    corpus, evals = folder / "corpus.jsonl", folder / "eval.jsonl"
    stamp = folder / "corpus.size"
    if corpus.exists() and stamp.exists() and stamp.read_text() == str(num_docs):
        return corpus, evals
    folder.mkdir(parents=True, exist_ok=True)
    rng, vocab = random.Random(seed), vocabulary(20_000, seed)
    examples = [sentence(rng, vocab, rng.randint(30, 80)) for _ in range(5000)]
    with open(evals, "w") as f:
        for text in examples:
            f.write(json.dumps({"text": text}) + "\n")
    recent: list[str] = []
    with open(corpus, "w") as f:
        for i in range(num_docs):
            roll = rng.random()
            if roll < 0.10 and recent:
                text = near_duplicate(rng.choice(recent), rng, vocab, 0.03, (3, 6))
            elif roll < 0.12 and recent:
                text = respace(rng.choice(recent), rng)
            else:
                text = document(rng, vocab, rng.randint(100, 500))
                if roll < 0.13:
                    words = rng.choice(examples).split()
                    at = text.find(". ", len(text) // 2) + 2
                    text = text[:at] + " ".join(words[:13]) + " " + text[at:]
                recent = (recent + [text])[-1000:]
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    stamp.write_text(str(num_docs))
    return corpus, evals


def run_step(step: str, corpus: Path, evals: Path, workers: int, folder: Path) -> dict:
    output = folder / f"{step}_w{workers}.jsonl"
    command = [sys.executable, str(ROOT / "tools" / f"{step}.py"), "--input", str(corpus),
               "--output", str(output), "--workers", str(workers), "--no-progress"]
    if step == "decontaminate":
        command += ["--eval", str(evals)]
    start, load = time.perf_counter(), os.getloadavg()[0]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads(output.with_name(output.stem + ".summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - start
    summary["load"] = (load + os.getloadavg()[0]) / 2
    return summary


def table(results: list[dict]) -> str:
    rows = ["| step | workers | documents | MB | seconds | docs/s | MB/s | CPU s | docs/CPU s | "
            "load | removed | peak RSS main / worker (MB) |", "|---" * 12 + "|"]
    for r in results:
        removed = ", ".join(f"{k} {v}" for k, v in r["removed"].items() if v) or "0"
        if "documents_contaminated" in r:
            removed = f"{r['documents_contaminated']} cut ({removed} whole)"
        worker_rss = r["workers_peak_rss_mb"] if r["workers"] > 1 else "-"
        rows.append(f"| {r['tool']} | {r['workers']} | {r['docs_in']:,} | "
                    f"{r['bytes_in'] / 1e6:.0f} | {r['seconds']:.1f} | {r['docs_per_s']:,.0f} | "
                    f"{r['mb_per_s']:.1f} | {r['cpu_s']:.1f} | {r['docs_per_cpu_s']:,.0f} | "
                    f"{r['load']:.1f} | {removed} | {r['peak_rss_mb']:.0f} / {worker_rss} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "nanomt_bench_curation")
    parser.add_argument("--steps", nargs="+", default=["dedup", "decontaminate"],
                        choices=["dedup", "decontaminate", "filter_quality"])
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting; the fastest")
    args = parser.parse_args()
    start = time.perf_counter()
    corpus, evals = generate(args.dir, args.docs)
    print(f"corpus: {args.docs:,} documents, {corpus.stat().st_size / 1e6:.0f} MB "
          f"({time.perf_counter() - start:.0f} s to generate); {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for step in args.steps:
        for workers in args.workers:
            runs = [run_step(step, corpus, evals, workers, args.dir) for _ in range(args.repeat)]
            results.append(min(runs, key=lambda r: r["seconds"]))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
