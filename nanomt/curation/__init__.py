"""Data curation before tokenisation, the three steps the MT-NLG paper names (Smith et al. 2022).

    dedup.py          exact (normalised-text hash) and fuzzy (MinHash + LSH) document deduplication
    decontaminate.py  remove n-gram overlaps with downstream evaluation sets, splitting documents
    quality.py        Gopher / C4-style heuristic quality rules
    stream.py         what the three share: streaming JSONL in and out, worker processes, the
                      progress bar and the end summary

Every step reads JSONL (one JSON object per line, its text under a key, "text" by default) and
writes JSONL, so the steps chain: raw -> dedup -> decontaminate -> filter_quality -> tokenise.
The command-line front ends are tools/dedup.py, tools/decontaminate.py, tools/filter_quality.py.
Fuzzy deduplication needs the `curate` extra (`pip install -e '.[curate]'`, for datasketch).
"""
