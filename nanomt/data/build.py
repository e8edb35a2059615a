"""From the `data.` config to the train and validation sample streams: one path for every source.

    data.blend=[W1, PREFIX1, W2, PREFIX2, ...]   a weighted blend of indexed datasets
    data.path=PREFIX                             one indexed dataset (PREFIX.bin / PREFIX.idx)
    data.name=shakespeare | FILE.txt[.xz|.gz]    a text file, preprocessed on first use into
                                                 the cache (nanomt.data.preprocess), then as above

Every source is split by documents (data.split, or [1 - val_fraction, val_fraction, 0]); the
training stream holds exactly the samples train.steps will consume (with the ramp-up), the
validation stream train.eval_batches global batches.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from nanomt.data.blend import BlendedDataset
from nanomt.data.cache import default_cache_dir, file_digest, on_rank_zero
from nanomt.data.dataset import CORPUS_PATH, SHAKESPEARE, tokenizer_fingerprint
from nanomt.data.gpt_dataset import GPTDataset, parse_split, split_ranges
from nanomt.data.indexed import IndexedDataset, IndexedFormatError, dtype_holds, index_file
from nanomt.data.preprocess import preprocess
from nanomt.data.rampup import BatchSchedule
from nanomt.data.sampler import GlobalBatchSampler
from nanomt.data.tokenizer import build_tokenizer
from nanomt.errors import ConfigError

SPLITS = {"train": 0, "valid": 1, "test": 2}


def blend_pairs(blend: Sequence) -> list[tuple[float, str]]:
    """[W1, P1, W2, P2, ...] -> [(W1, P1), ...]; a list of prefixes alone weighs them equally."""
    items = list(blend)
    if items and all(isinstance(x, str) for x in items):
        return [(1.0, p) for p in items]
    if len(items) % 2 or not items:
        raise ValueError(f"data.blend must alternate weights and prefixes [W1, PREFIX1, ...], "
                         f"got {len(items)} items")
    pairs = []
    for weight, prefix in zip(items[0::2], items[1::2]):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
                not isinstance(prefix, str):
            raise ValueError(f"data.blend must alternate weights and prefixes, got "
                             f"{weight!r}, {prefix!r}")
        pairs.append((float(weight), prefix))
    weights = [w for w, _ in pairs]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.blend weights must be non-negative with a positive sum, got "
                         f"{weights}")
    return pairs


def text_corpus_path(name: str) -> Path:
    return CORPUS_PATH if name == SHAKESPEARE else Path(name).expanduser()


def prepare_text_corpus(name: str, tokenizer: str, cache_dir: str | None) -> Path:
    """The indexed prefix of a text corpus, preprocessed into the cache the first time."""
    source = text_corpus_path(name)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = _text_key(source, tokenizer)
    stem = source.name.split(".")[0] or "corpus"
    prefix = folder / f"{stem}.{key}"

    def build() -> None:
        if not index_file(prefix).is_file():
            preprocess([str(source)], prefix, tokenizer)
    on_rank_zero(build)
    return prefix


def _text_key(source: Path, tokenizer: str) -> str:
    digest = hashlib.sha256()
    for part in ("nanomt-text-v1", file_digest(source),
                 tokenizer_fingerprint(build_tokenizer(tokenizer))):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def data_sources(cfg: DictConfig) -> list[tuple[float, str]]:
    """(weight, prefix) of every source the config names."""
    d = cfg.data
    if d.get("blend"):
        return blend_pairs(d.blend)
    if d.get("path"):
        return [(1.0, str(d.path))]
    if str(d.name).endswith(".bin"):  # PREFIX.bin of an indexed pair, named as a file
        return [(1.0, str(d.name)[:-len(".bin")])]
    return [(1.0, str(prepare_text_corpus(str(d.name), str(d.tokenizer), d.cache_dir)))]


def split_weights(cfg: DictConfig) -> list[float]:
    if cfg.data.get("split"):
        return parse_split(cfg.data.split)
    vf = float(cfg.data.val_fraction)
    return [1.0 - vf, vf, 0.0]


def build_stream(cfg: DictConfig, split: str, seq_len: int, num_samples: int):
    """The sample stream of one split: a GPTDataset, or a BlendedDataset of them."""
    sources = data_sources(cfg)
    weights = split_weights(cfg)
    seed, cache_dir = int(cfg.train.seed), cfg.data.cache_dir
    opened = [IndexedDataset(prefix) for _, prefix in sources]

    def source(d: int, n: int) -> GPTDataset:
        ranges = split_ranges(opened[d].num_documents, weights)
        return GPTDataset(opened[d], ranges[SPLITS[split]], seq_len, n, seed, cache_dir,
                          split)
    if len(sources) == 1:
        return source(0, num_samples)
    folder = Path(cache_dir) if cache_dir else Path(sources[0][1]).parent / "cache"
    return BlendedDataset([w for w, _ in sources], num_samples, source, folder,
                          f"blend.{split}")


def build_samplers(cfg: DictConfig, seq_len: int
                   ) -> tuple[GlobalBatchSampler, GlobalBatchSampler]:
    """(train, validation) samplers: the training stream holds the samples train.steps consume
    under the batch schedule (train.rampup_batch_size), validation train.eval_batches global
    batches of train.global_batch_size."""
    t = cfg.train
    schedule = BatchSchedule(int(t.global_batch_size), t.get("rampup_batch_size"))
    num_train = schedule.consumed_before(int(t.steps))
    num_eval = int(t.eval_batches) * int(t.global_batch_size)
    train = GlobalBatchSampler(build_stream(cfg, "train", seq_len, num_train), schedule,
                               int(t.seed))
    valid = GlobalBatchSampler(build_stream(cfg, "valid", seq_len, num_eval),
                               int(t.global_batch_size), int(t.seed))
    return train, valid


TOKENIZER_FIX = "set data.tokenizer to byte, gpt2 or the path of a Hugging Face tokenizer.json"


@functools.lru_cache(maxsize=8)
def tokenizer_vocab_size(spec: str) -> int:
    """Loads the tokenizer (once per process: preflight and setup both ask)."""
    return build_tokenizer(spec).vocab_size


def check_data(cfg: DictConfig, model_vocab_size: int) -> None:
    """At start-up (nanomt.launch_checks.check_launch): the tokenizer loads and fits the model's
    vocabulary, and the corpus exists (it is not read: tokenizing it is the loader's job)."""
    spec = cfg.data.tokenizer
    try:
        vocab_size = tokenizer_vocab_size(spec)
    except FileNotFoundError as error:  # a tokenizer.json path naming no file
        raise ConfigError(f"data.tokenizer: {error}", TOKENIZER_FIX) from error
    except ValueError as error:  # not byte, gpt2 or a .json path (build_tokenizer)
        raise ConfigError(f"{error} in data.tokenizer", TOKENIZER_FIX) from error
    except Exception as error:  # noqa: BLE001 - ImportError, OSError, tokenizers' own errors
        raise ConfigError(f"data.tokenizer={spec!r} cannot be loaded: {error}",
                          TOKENIZER_FIX) from error
    if vocab_size > model_vocab_size:
        raise ConfigError(f"data.tokenizer={spec!r} has {vocab_size} tokens but "
                          f"model.vocab_size is {model_vocab_size}",
                          f"set model.vocab_size >= {vocab_size} (or a model preset with that "
                          f"vocabulary), or use a smaller tokenizer")
    check_data_sources(cfg, vocab_size)


def check_data_sources(cfg: DictConfig, vocab_size: int) -> None:
    """data.blend pairs weights (>= 0) with prefixes; each indexed pair (data.blend, data.path)
    exists, parses and stores ids in a dtype that holds the tokenizer's; or the text file of
    data.name exists. Raises ConfigError naming the key."""
    d = cfg.data
    if d.get("split"):
        try:
            parse_split(d.split)
        except ValueError as error:
            raise ConfigError(f"data.split: {error}", "set data.split, e.g. '969,30,1'") from error
    if d.get("blend"):
        try:
            pairs = blend_pairs(list(d.blend))
        except ValueError as error:
            raise ConfigError(str(error), "set data.blend=[W1,PREFIX1,W2,PREFIX2,...]") from error
        prefixes, key = [p for _, p in pairs], "data.blend"
    elif d.get("path"):
        prefixes, key = [str(d.path)], "data.path"
    elif str(d.name).endswith(".bin"):
        prefixes, key = [str(d.name)[:-len(".bin")]], "data.name"
    else:
        if not text_corpus_path(str(d.name)).is_file():
            raise ConfigError(f"data.name: dataset file not found: {text_corpus_path(d.name)}",
                              f"set data.name to '{SHAKESPEARE}' or the path of a text file "
                              f"(.txt, .txt.xz, .txt.gz, .jsonl), or data.path=PREFIX")
        return
    for prefix in prefixes:
        try:
            dataset = IndexedDataset(Path(prefix).expanduser())
        except IndexedFormatError as error:
            raise ConfigError(f"{key}: {error}", f"fix {key} (PREFIX without .bin/.idx; "
                              f"tools/preprocess_data.py writes the pair)") from error
        if not dtype_holds(dataset.dtype, vocab_size):
            raise ConfigError(f"{key}: {prefix}.bin stores {dataset.dtype} ids, too small for "
                              f"data.tokenizer={d.tokenizer!r} ({vocab_size} tokens)",
                              "preprocess again with that tokenizer or fix data.tokenizer")


def main(argv: list[str] | None = None) -> None:
    """`python -m nanomt.data.build [overrides]`: build (or find) the index cache of a run's
    data in one process, before a large launch, so no rank waits on it at start-up."""
    import sys
    import time

    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(sys.argv[1:] if argv is None
                                                           else argv))
    start = time.perf_counter()
    train, valid = build_samplers(cfg, int(cfg.model.seq_len))
    print(f"nanomt: data indices ready in {time.perf_counter() - start:.1f} s: "
          f"{len(train.stream):,} training and {len(valid.stream):,} validation samples")


if __name__ == "__main__":
    main()
