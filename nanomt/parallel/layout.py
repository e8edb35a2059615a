"""The layout's rule: tp * cp * pp * dp ranks cover the world exactly, and ep (expert
parallelism, folded into the dp x cp ranks: nanomt.parallel.grid) divides dp * cp.

Checked before any collective, by config validation (nanomt.config, which turns the error into
a config error) and by the grid itself, so that a bad layout fails with one clear line on every
rank alike instead of a shape error or a hang.
"""

from __future__ import annotations


def validate_layout(world_size: int, tp: int, pp: int, dp: int | None, cp: int = 1,
                    ep: int = 1) -> int:
    """Raise a clear error ("what: fix") when the layout cannot cover the world. Returns dp;
    dp=None takes what tp*cp*pp leaves of the world."""
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("cp", cp), ("ep", ep)):
        if (value is None and name == "dp") or (
                isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            continue
        rule = "a positive integer or null" if name == "dp" else "a positive integer"
        raise ValueError(f"parallel.{name} must be {rule}, got {value!r}: set parallel.{name}")
    if dp is None:
        if world_size % (tp * cp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp*cp*pp = "
                             f"{tp}*{cp}*{pp}, so parallel.dp cannot be inferred: launch a "
                             f"multiple of tp*cp*pp processes or change parallel.tp/cp/pp")
        dp = world_size // (tp * cp * pp)
    if tp * cp * pp * dp != world_size:
        raise ValueError(
            f"world size {world_size} != tp*cp*pp*dp = {tp}*{cp}*{pp}*{dp} = "
            f"{tp * cp * pp * dp}: launch tp*cp*pp*dp processes or change parallel.tp/cp/pp/dp"
        )
    if (dp * cp) % ep:
        raise ValueError(f"parallel.ep = {ep} does not divide dp*cp = {dp}*{cp}: expert "
                         f"parallelism splits the data-parallel ranks; set parallel.ep to a "
                         f"divisor of dp*cp")
    return dp
