"""Evaluation and generation from checkpoints of any layout (docs/eval.md).

    runner      a checkpoint's model under any (tp, pp, dp), full logits on every rank
    scoring     log p(continuation | context), as lm-evaluation-harness tokenizes it
    tasks       multiple-choice and last-word tasks over local JSONL, k-shot prompts
    perplexity  validation loss and perplexity over a dataset
    generation  greedy / temperature / top-k / top-p sampling with a KV cache
    report      the console table and results.json
    harness     an lm-evaluation-harness model (needs the `eval` extra; imported on demand)
"""
