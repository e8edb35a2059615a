"""Private torch APIs in nanomt: each one has no public replacement, is used in one place, and
says why in a comment just above. A private API is a module below torch whose name starts with
an underscore (torch.utils._python_dispatch), torch.testing, an op namespace that belongs to
torch's compiler (torch.ops.inductor), torch._C's bindings, or the internals of nn.Module (`_parameters`, `_buffers`,
`_modules`) and of autograd (`_execution_engine`). torch's underscore functions at its top level
(torch._foreach_norm, torch._assert_async: fused and asynchronous kernels that torch.optim uses
too) are not counted. Reads the source with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nanomt"

# the private API -> the one file allowed to use it
ALLOWED = {"torch.utils._python_dispatch": "memory.py",  # TorchDispatchMode (PeakMemoryMeter)
           "torch._dynamo": "memory.py",  # imported ahead of a measurement (PeakMemoryMeter)
           "torch.ops.inductor": "parallel/data_parallel/buckets.py",  # resize_storage_bytes_
           "torch._C": "parallel/data_parallel/stage3.py"}  # is a backward running (recompute)
PRIVATE_ATTRIBUTES = ("_parameters", "_buffers", "_modules", "_execution_engine")


def private_uses(source: str) -> list[tuple[int, str]]:
    """(line, private API) of every use in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names
                      if is_private_module(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and is_private_module(
                node.module):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Attribute) and ast.unparse(node) in ("torch.ops.inductor",
                                                                        "torch._C"):
            found.append((node.lineno, ast.unparse(node)))
    return found


def is_private_module(name: str) -> bool:
    """torch.testing, or a torch module with an underscore-named part (torch.utils._pytree)."""
    parts = name.split(".")
    return parts[0] == "torch" and (parts[1:2] == ["testing"]
                                    or any(part.startswith("_") for part in parts[1:]))


def violations(files: dict[str, str]) -> list[str]:
    """Uses outside their one allowed file, or without a comment line just above."""
    bad = []
    for path, source in files.items():
        lines = source.splitlines()
        for line, name in private_uses(source):
            if ALLOWED.get(name) != path:
                bad.append(f"{path}:{line}: {name} (not allowed here)")
            elif not lines[line - 2].lstrip().startswith("#"):
                bad.append(f"{path}:{line}: {name} without a comment saying why")
    return bad


def test_private_torch_apis_are_allowed_commented_and_in_one_place():
    files = {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}
    assert violations(files) == []
    used = {name: path for path, source in files.items() for _, name in private_uses(source)}
    assert used == ALLOWED  # an allowance nothing needs any more goes


def test_planted_private_uses_are_found():
    planted = {"model/gpt.py": "from torch.testing._internal.distributed.fake_pg import FakeStore\n"
                               "x = module._parameters\n",
               "memory.py": "from torch.utils._python_dispatch import TorchDispatchMode\n"}
    assert violations(planted) == [
        "model/gpt.py:1: torch.testing._internal.distributed.fake_pg (not allowed here)",
        "model/gpt.py:2: _parameters (not allowed here)",
        "memory.py:1: torch.utils._python_dispatch without a comment saying why"]
