"""Train a byte-level BPE tokenizer (GPT-2's kind) on a corpus and write its tokenizer.json.

    python tools/train_tokenizer.py --input 'corpus/*.txt' --vocab-size 32000 \\
        --output tokenizers/mine/tokenizer.json
    # then: tools/preprocess_data.py --tokenizer tokenizers/mine/tokenizer.json ...

Byte-level BPE starts from the 256 byte values, so any text encodes without unknown tokens, and
merges the most frequent adjacent pair until the vocabulary has --vocab-size entries
(Sennrich et al. 2016; Radford et al. 2019). The text is split with GPT-2's pre-tokenizer
regex, and `<|endoftext|>` is added as a special token (nanomt's end-of-text id). Files are read
document by document (nanomt.data.preprocess), never whole.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanomt.data.preprocess import expand_inputs, iter_documents
from nanomt.data.tokenizer import GPT2_EOT_TOKEN, _import_tokenizers


def train_tokenizer(inputs: list[str], output: str | Path, vocab_size: int,
                    min_frequency: int = 2, json_key: str = "text") -> Path:
    """Train on the documents of `inputs` (paths or globs); returns the tokenizer.json path."""
    tk = _import_tokenizers("training a tokenizer")
    files = expand_inputs(inputs)
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[GPT2_EOT_TOKEN],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    documents = (doc for path in files for doc in iter_documents(path, json_key))
    tokenizer.train_from_iterator(documents, trainer=trainer)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, nargs="+", help="files or glob patterns")
    parser.add_argument("--output", required=True, help="the tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--json-key", default="text")
    args = parser.parse_args(argv)
    path = train_tokenizer(args.input, args.output, args.vocab_size, args.min_frequency,
                           args.json_key)
    from nanomt.data.tokenizer import HFTokenizerFile
    tok = HFTokenizerFile(path)
    print(f"wrote {path}: {tok.vocab_size} tokens, end-of-text id {tok.eot_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
