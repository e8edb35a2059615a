"""Print continuations of prompts from a checkpoint (any layout; docs/eval.md).

    python -m nanomt.generate checkpoint=DIR prompt="ROMEO:" gen.max_new_tokens=100
        gen.temperature=0.8
    torchrun --nproc_per_node=2 -m nanomt.generate checkpoint=DIR parallel.tp=2 gen.temperature=0

The sampling itself (greedy, temperature, top-k, top-p, KV cache) is nanomt/eval/generation.py.
"""

from __future__ import annotations

import sys

from nanomt.eval.cli import hydra_entry, run_generate


def main(argv: list[str] | None = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    hydra_entry("generate", lambda cfg, run_dir: run_generate(cfg))


if __name__ == "__main__":
    main()
