"""Benchmark the data path: preprocessing throughput and dataset start-up, on a local corpus.

    python tools/bench/bench_data.py --size-mb 200 --out /tmp/bench_data

1. Generates a text corpus of --size-mb (paragraphs of the embedded Shakespeare corpus in a
   seeded random order, so BPE sees real English), once, under --out.
2. Runs tools/preprocess_data.py on it for each tokenizer and worker count, each in its own
   process, and reports MB/s, tokens/s and the peak resident memory of the tool (its main
   process and its largest worker: constant memory means these do not grow with the input).
3. Opens a GPTDataset over the result cold (indices built) and cached (indices mapped), and a
   two-source blend the same way, and reports the start-up times.
Prints a Markdown table and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nanomt.data.blend import BlendedDataset  # noqa: E402
from nanomt.data.dataset import CORPUS_PATH  # noqa: E402
from nanomt.data.gpt_dataset import GPTDataset  # noqa: E402
from nanomt.data.indexed import IndexedDataset  # noqa: E402
from nanomt.data.preprocess import paragraphs  # noqa: E402

# Runs the tool in a child and reports its peak memory (self) and its workers' (children).
MEASURE = """
import json, resource, runpy, sys
sys.argv = ["preprocess_data.py"] + sys.argv[1:]
try:
    runpy.run_path(%r, run_name="__main__")
except SystemExit:
    pass
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print("PEAK", json.dumps({"main_mb": me.ru_maxrss / 1024, "worker_mb": kids.ru_maxrss / 1024}))
"""


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> Path:
    """About size_mb MB of text: Shakespeare paragraphs, reshuffled for every copy."""
    if path.is_file() and path.stat().st_size >= size_mb * 1e6:
        return path
    text = lzma.decompress(CORPUS_PATH.read_bytes()).decode()
    paras = list(paragraphs(iter(text.splitlines(keepends=True))))
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            for k in rng.permutation(len(paras)):
                f.write(paras[k])
            written += len(text.encode())
    return path


def preprocess(corpus: Path, prefix: Path, tokenizer: str, workers: int) -> dict:
    tool = ROOT / "tools" / "preprocess_data.py"
    summary = prefix.with_suffix(".summary.json")
    args = ["--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer", tokenizer,
            "--workers", str(workers), "--no-progress", "--summary-json", str(summary)]
    out = subprocess.run([sys.executable, "-c", MEASURE % str(tool), *args], check=True,
                         capture_output=True, text=True).stdout
    peak = json.loads(out.split("PEAK", 1)[1])
    result = json.loads(summary.read_text())
    mb = result["input_bytes"] / 1e6
    return {"tokenizer": tokenizer, "workers": workers, "mb": mb, "tokens": result["tokens"],
            "seconds": result["seconds"], "mb_per_s": mb / result["seconds"],
            "mtokens_per_s": result["tokens"] / result["seconds"] / 1e6, **peak}


def startup(prefix: Path, cache: Path, seq_len: int, blend: bool) -> dict:
    """Seconds to open the dataset cold (indices built) and cached (indices mapped)."""
    shutil.rmtree(cache, ignore_errors=True)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        ds = IndexedDataset(prefix)
        num = (ds.num_tokens // seq_len) * 3  # three epochs of samples
        if blend:
            BlendedDataset([0.7, 0.3], num, lambda d, n: GPTDataset(
                ds, (0, ds.num_documents), seq_len, n, d, cache), cache)
        else:
            GPTDataset(ds, (0, ds.num_documents), seq_len, num, 0, cache)
        times.append(time.perf_counter() - t0)
    return {"kind": "blend of 2" if blend else "gpt", "seq_len": seq_len, "samples": num,
            "documents": ds.num_documents, "cold_s": times[0], "cached_s": times[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--out", default="/tmp/nanomt_bench_data")
    parser.add_argument("--tokenizers", nargs="+", default=["byte", "gpt2"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(out / f"corpus_{args.size_mb}mb.txt", args.size_mb)
    runs = [preprocess(corpus, out / f"{tok.replace('/', '_')}_w{w}", tok, w)
            for tok in args.tokenizers for w in args.workers]
    prefix = out / f"{args.tokenizers[-1].replace('/', '_')}_w{args.workers[0]}"
    starts = [startup(prefix, out / "cache", args.seq_len, blend) for blend in (False, True)]
    print(f"corpus: {corpus.stat().st_size / 1e6:,.0f} MB\n")
    print("| tokenizer | workers | MB/s | M tokens/s | peak RSS main / worker (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['tokenizer']} | {r['workers']} | {r['mb_per_s']:.1f} | "
              f"{r['mtokens_per_s']:.2f} | {r['main_mb']:.0f} / {r['worker_mb']:.0f} |")
    print("\n| dataset | documents | samples (s=%d) | cold start (s) | cached start (s) |"
          % args.seq_len)
    print("| --- | --- | --- | --- | --- |")
    for s in starts:
        print(f"| {s['kind']} | {s['documents']:,} | {s['samples']:,} | {s['cold_s']:.2f} | "
              f"{s['cached_s']:.3f} |")
    (out / "results.json").write_text(json.dumps({"preprocess": runs, "startup": starts},
                                                 indent=2))


if __name__ == "__main__":
    main()
