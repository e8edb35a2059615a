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
the corpus instead of quadratic. datasketch's MinHashLSH chooses b and r that minimise a weighted
sum of the false-positive mass (integral of P over [0, t]) and the false-negative mass (of 1 - P
over [t, 1]). Every candidate is verified here (J^ >= t), so a false positive costs one
comparison and a false negative a missed duplicate: false negatives weigh 0.9. For t = 0.8 and
k = 128 that gives b = 14, r = 9 (P = 0.87 at s = 0.8, 0.999 at 0.9), where equal weights give
b = 9, r = 13 (0.40). The buckets themselves are sorted numpy arrays, one per band, rather than
MinHashLSH's index, which keeps a Python set per bucket (about 5.5 KB per document measured)
and is updated one document at a time in the main process.

Clusters. Verified pairs are joined by union-find (each cluster's root is its first document);
each cluster keeps one document, the first in the file or the longest (`keep="longest"`), and
the others go to OUT.removed.jsonl with the id of the kept document and their similarity to it.

Two passes over the input. Pass 1: worker processes compute each document's digest, signature
and band hashes; the main process collects them as arrays, then groups equal digests and, band
by band, sorts the band hashes and verifies the documents that share one. Pass 2 rereads the
input and sends each line to OUT or to OUT.removed.jsonl. Memory per document: its signature
(4 k bytes), b band hashes (8 b), its digest, length and id; never its text. A long document is
hashed SHINGLE_CHUNK shingles at a time (datasketch permutes a whole batch at once, k x batch
64-bit numbers), so a worker's working memory does not grow with a document's length either.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from array import array
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from nanomt.curation.stream import (JsonlWriter, Line, Summary, batch_bytes, check_paths,
                                    check_workers, document_id, map_ordered, parse_document,
                                    progress_bar, read_batches, sibling)
from nanomt.errors import ConfigError

try:
    from datasketch import MinHash, MinHashLSH
except ImportError:  # the `curate` extra; exact deduplication works without it
    MinHash = MinHashLSH = None

# LSH parameter choice when --bands/--rows are not given: (false-positive, false-negative) weights
LSH_WEIGHTS = (0.1, 0.9)
WORD = re.compile(r"\w+")
BASE = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the band hash
SHINGLE_CHUNK = 2048  # shingles per MinHash.update_batch: k * 2048 * 8 bytes = 2 MB at k = 128


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
        if self.bands is not None and (self.bands < 1 or self.rows < 1
                                       or self.bands * self.rows > self.num_perm):
            raise ConfigError(f"--bands {self.bands} --rows {self.rows} need bands, rows >= 1 "
                              f"and bands * rows <= --num-perm {self.num_perm}")
        if not self.exact_only and MinHash is None:
            raise ConfigError("fuzzy deduplication needs datasketch",
                              "pip install -e '.[curate]', or pass --exact")


def choose_bands(options: DedupOptions) -> tuple[int, int]:
    """(b, r): as given, or datasketch's choice for the threshold and number of permutations."""
    if options.bands is not None:
        return options.bands, options.rows
    try:
        lsh = MinHashLSH(threshold=options.threshold, num_perm=options.num_perm,
                         weights=LSH_WEIGHTS)
    except ValueError as error:
        raise ConfigError(f"no LSH banding for --threshold {options.threshold} and --num-perm "
                          f"{options.num_perm} ({error})", "pass --bands and --rows") from None
    return lsh.b, lsh.r


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """P[two documents of Jaccard s share a band] = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - s ** rows) ** bands


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


def update_in_chunks(minhash: MinHash, doc_shingles: set[bytes]) -> None:
    """minhash.update_batch(doc_shingles), SHINGLE_CHUNK at a time: the same signature (a minimum
    of minima), with the k x chunk temporary arrays bounded whatever the document's length."""
    items = list(doc_shingles)
    for start in range(0, len(items), SHINGLE_CHUNK):
        minhash.update_batch(items[start:start + SHINGLE_CHUNK])


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n, k] signatures -> [n, b] 64-bit hashes of each band's r rows (mod 2^64)."""
    rows_of = signatures[:, :bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    hashes = rows_of[:, :, 0].copy()
    for j in range(1, rows):
        hashes = hashes * BASE + rows_of[:, :, j]
    return hashes


@dataclass
class Signed:
    """A batch of documents as columns (numpy arrays cross between processes as one buffer)."""

    ids: list[Any]
    lengths: np.ndarray                # characters, for keep="longest"
    digests: np.ndarray                # [n] 16-byte exact digests
    signatures: np.ndarray | None      # [n, k] MinHash signatures (None with exact_only)
    bands: np.ndarray | None           # [n, b] band hashes
    has_words: np.ndarray | None       # False: no shingles, nothing to compare

    @staticmethod
    def empty(options: DedupOptions) -> Signed:
        fuzzy = not options.exact_only
        return Signed([], np.zeros(0, dtype=np.int64), np.zeros(0, dtype="V16"),
                      np.zeros((0, options.num_perm), dtype=np.uint64) if fuzzy else None,
                      np.zeros((0, options.bands), dtype=np.uint64) if fuzzy else None,
                      np.zeros(0, dtype=bool) if fuzzy else None)

    @staticmethod
    def concatenate(parts: list[Signed]) -> Signed:
        def cat(name):
            arrays = [getattr(p, name) for p in parts]
            return None if not arrays or arrays[0] is None else np.concatenate(arrays)
        return Signed([i for p in parts for i in p.ids], cat("lengths"), cat("digests"),
                      cat("signatures"), cat("bands"), cat("has_words"))


_WORKER: dict[str, Any] = {}


def _init_worker(options: DedupOptions, source: str) -> None:
    _WORKER.update(options=options, source=source)
    if not options.exact_only:
        _WORKER["empty"] = make_minhash(options.num_perm, options.seed)


def sign_batch(batch: list[Line]) -> Signed:
    """Parse a batch of lines; each document's digest, MinHash signature and band hashes."""
    options: DedupOptions = _WORKER["options"]
    ids, lengths, digests, signatures, has_words = [], [], [], [], []
    for line, raw in batch:
        record, text = parse_document(raw, f"{_WORKER['source']}:{line}", options.text_key)
        ids.append(document_id(record, options.id_key, line))
        lengths.append(len(text))
        digests.append(exact_digest(text))
        if not options.exact_only:
            minhash = _WORKER["empty"].copy()
            doc_shingles = shingles(text, options.ngram)
            update_in_chunks(minhash, doc_shingles)
            signatures.append(minhash.hashvalues)
            has_words.append(bool(doc_shingles))
    signed = Signed(ids, np.array(lengths, dtype=np.int64),
                    np.frombuffer(b"".join(digests), dtype="V16"), None, None, None)
    if not options.exact_only:
        signed.signatures = np.stack(signatures)
        signed.bands = band_hashes(signed.signatures, options.bands, options.rows)
        signed.has_words = np.array(has_words, dtype=bool)
    return signed


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """J^ = fraction of signature rows that agree."""
    return float(np.count_nonzero(a == b)) / len(a)


# ---- clusters (in the main process) -------------------------------------------------------------
class UnionFind:
    """Disjoint sets over 0..n-1 starting from `parent`; a set's root is its smallest member."""

    def __init__(self, parent: np.ndarray):
        self.parent = array("q")
        self.parent.frombytes(parent.astype(np.int64).tobytes())

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

    def roots(self) -> np.ndarray:
        """Every element's root, by pointer jumping: parent <- parent[parent] until it stops."""
        parent = np.frombuffer(self.parent, dtype=np.int64).copy()
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand


def first_with_same_digest(digests: np.ndarray) -> np.ndarray:
    """For each document, the first document with the same exact digest (itself if none)."""
    _, first, group = np.unique(digests, return_index=True, return_inverse=True)
    return first[group.ravel()]


def buckets(keys: np.ndarray) -> list[np.ndarray]:
    """Positions in `keys` that share a value with another position, one ascending array each."""
    order = np.argsort(keys, kind="stable")
    same = keys[order][1:] == keys[order][:-1]  # sorted positions p and p + 1 share a value
    edges = np.flatnonzero(np.diff(np.concatenate(([0], same.astype(np.int8), [0]))))
    return [order[start:stop + 1] for start, stop in zip(edges[::2], edges[1::2])]


def join_similar(docs: Signed, sets: UnionFind, threshold: float) -> tuple[int, int]:
    """LSH: in each band, documents with equal band hashes are candidates; join each verified
    pair (J^ >= threshold). Returns (pairs compared, pairs verified).

    Within a bucket each document is compared with the first document of every cluster met so
    far in that bucket (and joins all it matches), not with every member: a bucket holding one
    cluster of m near-copies costs m comparisons instead of m^2 / 2."""
    # the first of each exact group stands for it (the others have the same shingles)
    searched = np.flatnonzero(docs.has_words & (np.frombuffer(sets.parent, dtype=np.int64)
                                                == np.arange(len(docs.ids))))
    compared = verified = 0
    for band in range(docs.bands.shape[1]):
        for bucket in buckets(docs.bands[searched, band]):
            heads: list[int] = []
            for i in searched[bucket].tolist():  # ascending: the earlier documents come first
                joined = False
                for head in heads:
                    if sets.find(head) == sets.find(i):
                        joined = True
                        continue
                    compared += 1
                    if estimated_jaccard(docs.signatures[i], docs.signatures[head]) >= threshold:
                        verified += 1
                        sets.union(i, head)
                        joined = True
                if not joined:
                    heads.append(i)
    return compared, verified


class Clusters:
    """Pass 1's result: for every document, the document kept in its place and how it matched."""

    def __init__(self, docs: Signed, options: DedupOptions):
        self.docs, self.options = docs, options
        self.exact_of = first_with_same_digest(docs.digests)
        sets = UnionFind(self.exact_of)
        self.compared = self.verified = 0
        if not options.exact_only:
            self.compared, self.verified = join_similar(docs, sets, options.threshold)
        self.kept = self.choose_kept(sets.roots())

    def choose_kept(self, roots: np.ndarray) -> np.ndarray:
        """kept[i]: the root (the first), or the longest member of i's cluster (ties: first)."""
        if self.options.keep == "first" or len(roots) == 0:
            return roots
        order = np.lexsort((np.arange(len(roots)), -self.docs.lengths, roots))
        leads = np.concatenate(([True], roots[order][1:] != roots[order][:-1]))
        best = np.empty_like(roots)
        best[roots[order][leads]] = order[leads]
        return best[roots]

    def similarity(self, i: int, k: int) -> tuple[str, float]:
        """How removed document i duplicates kept document k: ("exact", 1.0) or ("fuzzy", J^)."""
        if self.exact_of[i] == self.exact_of[k]:
            return "exact", 1.0
        d = self.docs
        if not (d.has_words[i] and d.has_words[k]):
            return "fuzzy", 0.0
        return "fuzzy", estimated_jaccard(d.signatures[i], d.signatures[k])


# ---- the two passes -----------------------------------------------------------------------------
def find_duplicates(path: Path, options: DedupOptions, workers: int, progress: bool,
                    summary: Summary) -> Clusters:
    parts = []
    with progress_bar(path, "dedup: sign", progress) as bar:
        for batch, signed in map_ordered(sign_batch, read_batches(path, options.batch_size),
                                         workers, _init_worker, (options, str(path))):
            parts.append(signed)
            summary.docs_in += len(batch)
            summary.bytes_in += batch_bytes(batch)
            bar.update(batch_bytes(batch))
    return Clusters(Signed.concatenate(parts) if parts else Signed.empty(options), options)


def write_outputs(path: Path, output: Path, clusters: Clusters, progress: bool,
                  summary: Summary) -> None:
    """Pass 2: every input line goes to the output (kept) or to the removed file (annotated)."""
    i, ids = 0, clusters.docs.ids
    with JsonlWriter(output) as kept, JsonlWriter(sibling(output, ".removed.jsonl")) as removed, \
            progress_bar(path, "dedup: write", progress) as bar:
        for batch in read_batches(path, clusters.options.batch_size):
            for _, raw in batch:
                if i >= len(ids):
                    raise ConfigError(f"{path} changed during deduplication", "run it again")
                k = int(clusters.kept[i])
                if k == i:
                    kept.write_raw(raw)
                else:
                    reason, similarity = clusters.similarity(i, k)
                    record = json.loads(raw)
                    record.update(duplicate_of=ids[k], similarity=round(similarity, 4),
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
    if not options.exact_only:
        bands, rows = choose_bands(options)
        options = replace(options, bands=bands, rows=rows)
    clusters = find_duplicates(path, options, workers, progress, summary)
    write_outputs(path, output, clusters, progress, summary)
    summary.details.update(
        mode="exact" if options.exact_only else "exact+fuzzy",
        **{key: value for key, value in asdict(options).items()
           if key in ("threshold", "ngram", "num_perm", "bands", "rows", "keep")},
        candidate_pairs=clusters.compared, verified_pairs=clusters.verified,
        workers=workers, removed_file=str(sibling(output, ".removed.jsonl")))
    summary.finish()
    summary.write(sibling(output, ".summary.json"))
    return summary
