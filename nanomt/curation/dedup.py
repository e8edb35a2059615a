"""Document deduplication: exact by a normalised-text hash, fuzzy by MinHash + LSH (datasketch).

Exact. Lower-case the text, collapse whitespace, hash it (BLAKE2b, 128 bits): equal digests are
the same document up to case and spacing.

MinHash (Broder 1997). A document is the set A of its word n-gram shingles (n = 5 by default).
For a random permutation pi of the shingle space, the smallest permuted shingle is equally likely
to be any element of A ∪ B, and it lies in both sets exactly when it lies in A ∩ B, so

    P[min pi(A) = min pi(B)] = |A ∩ B| / |A ∪ B| = J(A, B).

With k permutations the signature sig(A) = (min pi_1(A), ..., min pi_k(A)) estimates

    J^(A, B) = (1/k) sum_i 1[sig_i(A) = sig_i(B)],   standard error sqrt(J (1 - J) / k)

(0.035 at J = 0.8 and k = 128), from k numbers per document whatever its length.

LSH banding. Cut the k rows into b bands of r rows (b r <= k) and hash each band: two documents
whose signatures agree on all r rows of some band meet in that band's bucket, which happens with

    P[candidate | J = s] = 1 - (1 - s^r)^b,

an S-curve rising around s = (1/b)^(1/r). Only candidates are compared, so the work is linear in
the corpus instead of quadratic. datasketch chooses b and r that minimise a weighted sum of the
false-positive mass (integral of P over [0, t]) and the false-negative mass (of 1 - P over
[t, 1]). Every candidate is verified here (J^ >= t), so a false positive costs one comparison and a
false negative a missed duplicate: false negatives weigh 0.9. For t = 0.8 and k = 128 that gives
b = 14, r = 9 (P = 0.87 at s = 0.8, 0.999 at 0.9), where equal weights give b = 9, r = 13 (0.40).

Clusters. Verified pairs are joined by union-find (each cluster's root is its first document);
each cluster keeps one document, the first in the file or the longest (`keep="longest"`), and
the others go to OUT.removed.jsonl with the id of the kept document and their similarity to it.

Two passes over the input: pass 1 computes each document's digest and signature in worker
processes and, in file order in the main process, queries and then extends the LSH index; pass
2 rereads the input and sends each line to OUT or OUT.removed.jsonl. Memory per document: its
signature (4 k bytes), its b band keys in the index, its id and a few integers; never its text.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from nanomt.curation.stream import (JsonlWriter, Line, Summary, batch_bytes, check_paths,
                                    check_workers, document_id, map_ordered, parse_document,
                                    progress_bar, read_batches, sibling)
from nanomt.errors import ConfigError

try:
    from datasketch import LeanMinHash, MinHash, MinHashLSH
except ImportError:  # the `curate` extra; exact deduplication works without it
    LeanMinHash = MinHash = MinHashLSH = None

# LSH parameter choice when --bands/--rows are not given: (false-positive, false-negative) weights
LSH_WEIGHTS = (0.1, 0.9)
WORD = re.compile(r"\w+")


@dataclass
class DedupOptions:
    threshold: float = 0.8       # Jaccard similarity at or above which two documents are duplicates
    ngram: int = 5               # words per shingle
    num_perm: int = 128          # k, MinHash permutations (signature length)
    bands: int | None = None     # b; with rows, overrides the choice from threshold and num_perm
    rows: int | None = None      # r
    exact_only: bool = False     # only the normalised-text hash, no MinHash
    keep: str = "first"          # "first" or "longest" document of each cluster
    text_key: str = "text"
    id_key: str = "id"
    seed: int = 1                # of the MinHash permutations
    batch_size: int = 256        # documents per worker task

    def check(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.ngram < 1 or self.num_perm < 2 or self.batch_size < 1:
            raise ConfigError("--ngram and --batch-size must be >= 1 and --num-perm >= 2")
        if self.keep not in ("first", "longest"):
            raise ConfigError(f"--keep must be 'first' or 'longest', got {self.keep!r}")
        if (self.bands is None) != (self.rows is None):
            raise ConfigError("--bands and --rows go together", "pass both or neither")
        if self.bands is not None and (self.bands < 2 or self.rows < 1
                                       or self.bands * self.rows > self.num_perm):
            raise ConfigError(f"--bands {self.bands} --rows {self.rows} need bands >= 2, rows >= 1"
                              f" and bands * rows <= --num-perm {self.num_perm}")
        if not self.exact_only and MinHash is None:
            raise ConfigError("fuzzy deduplication needs datasketch",
                              "pip install -e '.[curate]', or pass --exact")


# ---- per document (in the workers) --------------------------------------------------------------
def exact_digest(text: str) -> bytes:
    """128-bit hash of the text lower-cased with its whitespace collapsed."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()


def shingles(text: str, n: int) -> set[bytes]:
    """The set of word n-grams of the lower-cased text (the whole text if it has fewer words)."""
    words = WORD.findall(text.lower())
    if len(words) <= n:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


def make_minhash(num_perm: int, seed: int) -> MinHash:
    """An empty MinHash to copy per document. CRC-32 hashes each shingle to 32 bits (datasketch
    mixes it before permuting); it is several times faster than the default SHA-1."""
    return MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32)


class Signed(NamedTuple):
    line: int
    id: Any
    length: int                   # characters, for keep="longest"
    digest: bytes
    minhash: LeanMinHash | None   # None with exact_only, or for a text without words


_WORKER: dict[str, Any] = {}


def _init_worker(options: DedupOptions, source: str) -> None:
    _WORKER.update(options=options, source=source)
    if not options.exact_only:
        _WORKER["empty"] = make_minhash(options.num_perm, options.seed)


def sign_batch(batch: list[Line]) -> list[Signed]:
    """Parse a batch of lines and compute each document's digest and MinHash signature."""
    options: DedupOptions = _WORKER["options"]
    out = []
    for line, raw in batch:
        record, text = parse_document(raw, f"{_WORKER['source']}:{line}", options.text_key)
        minhash = None
        if not options.exact_only:
            doc_shingles = shingles(text, options.ngram)
            if doc_shingles:
                m = _WORKER["empty"].copy()
                m.update_batch(doc_shingles)
                minhash = LeanMinHash(m)
        out.append(Signed(line, document_id(record, options.id_key, line), len(text),
                          exact_digest(text), minhash))
    return out


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """J^ = fraction of signature rows that agree."""
    return float(np.count_nonzero(a == b)) / len(a)


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """P[two documents of Jaccard s share a band] = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - s ** rows) ** bands


# ---- the index (in the main process) ------------------------------------------------------------
class UnionFind:
    """Disjoint sets over 0..n-1; a set's root is its smallest member (its first document)."""

    def __init__(self) -> None:
        self.parent = array("q")

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class SignatureStore:
    """Signatures as rows of numpy blocks: 4 k bytes per document, no per-object overhead."""

    def __init__(self, num_perm: int, block: int = 4096):
        self.num_perm, self.block = num_perm, block
        self.blocks: list[np.ndarray] = []
        self.present = array("b")
        self.count = 0

    def append(self, values: np.ndarray | None) -> None:
        if self.count % self.block == 0:
            dtype = values.dtype if values is not None else np.uint64
            self.blocks.append(np.zeros((self.block, self.num_perm), dtype=dtype))
        if values is not None:
            self.blocks[-1][self.count % self.block] = values
        self.present.append(values is not None)
        self.count += 1

    def get(self, i: int) -> np.ndarray | None:
        return self.blocks[i // self.block][i % self.block] if self.present[i] else None


def make_index(options: DedupOptions) -> MinHashLSH:
    params = (options.bands, options.rows) if options.bands is not None else None
    try:
        return MinHashLSH(threshold=options.threshold, num_perm=options.num_perm,
                          weights=LSH_WEIGHTS, params=params)
    except ValueError as error:
        raise ConfigError(f"no LSH banding for --threshold {options.threshold} and --num-perm "
                          f"{options.num_perm} ({error})", "pass --bands and --rows") from None


class Clusters:
    """Pass 1's result: for every document, its cluster's kept document and how it was found."""

    def __init__(self, options: DedupOptions):
        self.options = options
        self.sets = UnionFind()
        self.ids: list[Any] = []
        self.lengths = array("q")
        self.exact_of = array("q")       # first document with the same digest
        self.first_with_digest: dict[bytes, int] = {}
        self.signatures = SignatureStore(options.num_perm)
        self.index = None if options.exact_only else make_index(options)
        self.candidates = self.verified = 0
        self.kept: array | None = None   # set by choose_kept

    def add(self, doc: Signed) -> None:
        """Index one document, in file order: join it to every earlier document it duplicates."""
        i = self.sets.add()
        self.ids.append(doc.id)
        self.lengths.append(doc.length)
        first = self.first_with_digest.setdefault(doc.digest, i)
        self.exact_of.append(first)
        values = doc.minhash.hashvalues if doc.minhash is not None else None
        self.signatures.append(values)
        if first != i:  # an exact duplicate has the same shingles too: nothing more to find
            self.sets.union(i, first)
            return
        if values is None:
            return
        for j in self.index.query(doc.minhash):
            self.candidates += 1
            if estimated_jaccard(values, self.signatures.get(j)) >= self.options.threshold:
                self.verified += 1
                self.sets.union(i, j)
        self.index.insert(i, doc.minhash, check_duplication=False)

    def choose_kept(self) -> None:
        """kept[i]: the document kept for i's cluster (i itself when i is kept)."""
        n = len(self.ids)
        roots = [self.sets.find(i) for i in range(n)]
        best = {}
        if self.options.keep == "longest":
            for i, root in enumerate(roots):  # ties keep the earlier document
                if root not in best or self.lengths[i] > self.lengths[best[root]]:
                    best[root] = i
        self.kept = array("q", (best.get(root, root) for root in roots))

    def similarity(self, i: int, k: int) -> tuple[str, float]:
        """How removed document i duplicates kept document k: ("exact", 1.0) or ("fuzzy", J^)."""
        if self.exact_of[i] == self.exact_of[k]:
            return "exact", 1.0
        a, b = self.signatures.get(i), self.signatures.get(k)
        return "fuzzy", (estimated_jaccard(a, b) if a is not None and b is not None else 0.0)


# ---- the two passes -----------------------------------------------------------------------------
def find_duplicates(path: Path, options: DedupOptions, workers: int, progress: bool,
                    summary: Summary) -> Clusters:
    clusters = Clusters(options)
    batches = read_batches(path, options.batch_size)
    with progress_bar(path, "dedup: sign", progress) as bar:
        for batch, signed in map_ordered(sign_batch, batches, workers, _init_worker,
                                         (options, str(path))):
            for doc in signed:
                clusters.add(doc)
            summary.docs_in += len(batch)
            summary.bytes_in += batch_bytes(batch)
            bar.update(batch_bytes(batch))
    clusters.choose_kept()
    return clusters


def write_outputs(path: Path, output: Path, clusters: Clusters, progress: bool,
                  summary: Summary) -> None:
    """Pass 2: every input line goes to the output (kept) or to the removed file (annotated)."""
    i = 0
    with JsonlWriter(output) as kept, JsonlWriter(sibling(output, ".removed.jsonl")) as removed, \
            progress_bar(path, "dedup: write", progress) as bar:
        for batch in read_batches(path, clusters.options.batch_size):
            for _, raw in batch:
                if i >= len(clusters.ids):
                    raise ConfigError(f"{path} changed during deduplication", "run it again")
                k = clusters.kept[i]
                if k == i:
                    kept.write_raw(raw)
                else:
                    reason, similarity = clusters.similarity(i, k)
                    record = json.loads(raw)
                    record.update(duplicate_of=clusters.ids[k], similarity=round(similarity, 4),
                                  reason=reason)
                    removed.write(record)
                    summary.remove(reason)
                i += 1
            bar.update(batch_bytes(batch))
    summary.docs_out = kept.count


def deduplicate(input_path: str | Path, output_path: str | Path,
                options: DedupOptions | None = None, workers: int = 1,
                progress: bool = True) -> Summary:
    """Deduplicate IN.jsonl into OUT.jsonl (+ OUT.removed.jsonl, OUT.summary.json)."""
    options = options or DedupOptions()
    options.check()
    check_workers(workers)
    path, output = Path(input_path), Path(output_path)
    check_paths([path], output)
    summary = Summary("dedup")
    clusters = find_duplicates(path, options, workers, progress, summary)
    write_outputs(path, output, clusters, progress, summary)
    summary.details.update(
        mode="exact" if options.exact_only else "exact+fuzzy",
        **{key: value for key, value in asdict(options).items()
           if key in ("threshold", "ngram", "num_perm", "keep")},
        bands=None if options.exact_only else clusters.index.b,
        rows=None if options.exact_only else clusters.index.r,
        candidate_pairs=clusters.candidates, verified_pairs=clusters.verified,
        workers=workers, removed_file=str(sibling(output, ".removed.jsonl")))
    summary.finish()
    summary.write(sibling(output, ".summary.json"))
    return summary
