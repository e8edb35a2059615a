"""docs/overview.md's reading order names files that exist, with their real line counts, and the
core's total is their sum: the number a reader is promised stays true as the code changes."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"^(?:\d+\.|-) \[([^\]]+)\]\(\.\./nanomt/([^)]+)\) \((\d+) lines\)")


def test_reading_order_counts_are_the_files_line_counts():
    text = (ROOT / "docs" / "overview.md").read_text()
    section = text.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    core_part, layers_part = section.split("Then the layers", 1)
    core = [ENTRY.match(line) for line in core_part.splitlines() if ENTRY.match(line)]
    layers = [ENTRY.match(line) for line in layers_part.splitlines() if ENTRY.match(line)]
    assert len(core) >= 15 and layers
    for match in core + layers:
        name, path, count = match.groups()
        assert name == path
        lines = (ROOT / "nanomt" / path).read_text().count("\n")
        assert int(count) == lines, f"{path}: the reading order says {count} lines, it has {lines}"
    total = int(re.search(r"\*\*([\d,]+) lines\*\* in all", core_part).group(1).replace(",", ""))
    assert total == sum(int(m.group(3)) for m in core)
    # what the core must contain, by name
    names = " ".join(m.group(2) for m in core)
    for piece in ("tensor_parallel.py", "schedules.py", "zero_stages.py", "sharded_adamw.py",
                  "trainer.py"):
        assert piece in names
