"""The bubble and the activation memory of each pipeline schedule, as closed forms.

A rank runs, per micro-batch and per chunk of its layers, a forward F and a backward; the
zero-bubble schedules (Qi et al. 2024, "Zero Bubble Pipeline Parallelism") split that backward
into B, the input's gradient, which the previous stage waits for, and W, the weights' gradient,
which nobody waits for. With T_F, T_B, T_W the times of one micro-batch's passes through a
rank's layers (1F1B's backward is B + W), p stages and m micro-batches, a rank is busy
m (T_F + T_B + T_W) per step and idles, at the start and at the end of the step:

    GPipe, 1F1B            (p-1)(T_F + T_B + T_W)       the first forward crossing p-1 stages,
                                                        the last backward crossing them back
    interleaved 1F1B, v    (p-1)(T_F + T_B + T_W) / v   the crossings are of chunks 1/v as long
    ZB-H1                  (p-1)(T_F + T_B - T_W)       the last backwards travel up as B alone
                                                        (T_W less each stage), and the W held
                                                        back fill (p-1) T_W of the wait
    ZB-V (v = 2, a V)      (p-1)(T_F + T_B - T_W) / 2   ZB-H1's in chunks half as long:
                                                        nanomt's V order
                                                        (zero_bubble.zbv_steps, replayed in
                                                        tests/test_zero_bubble.py); the paper's
                                                        hand-placed ZB-V reaches 0 at equal times

The bubble fraction is the idle over the busy time: with T_F = T_B = T_W (the paper's
assumption; a backward costs two forwards, and its two halves, dX = dY W^T and dW = X^T dY, the
same FLOPs) it is (p-1)/m for GPipe and 1F1B, (p-1)/(v m) interleaved, (p-1)/(3m) for ZB-H1 (a
third of 1F1B's) and (p-1)/(6m) for nanomt's ZB-V (a third of interleaved's at v = 2). Away
from equal times the ZB-V line is this module's estimate. Full recompute runs the forward again
in B, T_F : T_B : T_W = 1 : 2 : 1 (pass_times): ZB-H1's bubble is then (p-1)/(2m).

Activation memory, in micro-batches of a whole stage's activations on the first rank (the one
that holds the most; a zero-bubble micro-batch counts from its F to its W, since its linears'
inputs X and output gradients dY stay until W):

    GPipe m;  1F1B p;  interleaved p + (p-1)/v;  ZB-H1 p (1F1B's);  ZB-V p (1F1B's: 2p passes
    through chunks of half a stage)

each at most m (v m passes). estimate.py walks the real orders for the exact per-rank bytes;
tests/test_planner_zero_bubble.py checks that the walk reaches these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassTimes:
    """T_F, T_B, T_W: a micro-batch's forward, input-gradient and weight-gradient passes
    through one rank's layers, in any unit (only their ratios matter)."""

    forward: float = 1.0
    input_grad: float = 1.0
    weight_grad: float = 1.0

    @property
    def busy(self) -> float:
        return self.forward + self.input_grad + self.weight_grad


EQUAL = PassTimes()  # the paper's assumption, T_F = T_B = T_W


def pass_times(recompute: str) -> PassTimes:
    """T_F : T_B : T_W under train.activation_checkpointing: equal, except that full
    recompute runs the forward again inside B (1 : 2 : 1, so ZB-H1's bubble is (p-1)/(2m));
    selective recompute's attention scores are a small part of B, left out."""
    return PassTimes(input_grad=2.0) if recompute == "full" else EQUAL


def one_f_one_b_bubble(p: int, m: int, v: int = 1, t: PassTimes = EQUAL) -> float:
    """GPipe, 1F1B and interleaved 1F1B (v chunks per rank): (p-1)/(v m)."""
    return (p - 1) * t.busy / (v * m * t.busy)


def zb_h1_bubble(p: int, m: int, v: int = 1, t: PassTimes = EQUAL) -> float:
    """ZB-H1: (p-1)(T_F + T_B - T_W) / (m (T_F + T_B + T_W)); (p-1)/(3m) at equal times."""
    return (p - 1) * max(t.forward + t.input_grad - t.weight_grad, 0.0) / (m * t.busy)


def zbv_bubble(p: int, m: int, v: int = 2, t: PassTimes = EQUAL) -> float:
    """nanomt's ZB-V: ZB-H1's bubble in chunks half as long; (p-1)/(6m) at equal times."""
    return zb_h1_bubble(p, m, 1, t) / 2


BUBBLE = {"gpipe": one_f_one_b_bubble, "1f1b": one_f_one_b_bubble, "zb_h1": zb_h1_bubble,
          "zbv": zbv_bubble}
FORMULA = {"gpipe": "(p-1)/m", "1f1b": "(p-1)/(v m)",
           "zb_h1": "(p-1)(T_F + T_B - T_W) / (m (T_F + T_B + T_W))",
           "zbv": "(p-1)(T_F + T_B - T_W) / (2m (T_F + T_B + T_W))"}
SPLIT_BACKWARD = ("zb_h1", "zbv")  # the schedules with B and W passes


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1, t: PassTimes = EQUAL) -> float:
    """Idle over busy time of a rank under `schedule` (module docstring)."""
    return BUBBLE[schedule](p, m, v, t) if p > 1 else 0.0


def bubble_formula(schedule: str, v: int = 1, t: PassTimes = EQUAL) -> str:
    """The formula bubble_fraction evaluates, as the plan prints it."""
    if schedule == "1f1b" and v == 1:
        return "(p-1)/m"
    ratio = f"T_F : T_B : T_W = {t.forward:g} : {t.input_grad:g} : {t.weight_grad:g}"
    return FORMULA[schedule] + (f", {ratio}" if schedule in SPLIT_BACKWARD else "")


def peak_passes_in_flight(schedule: str, p: int, m: int, v: int = 1) -> int:
    """Most chunk passes whose activations the first rank holds at once (module docstring):
    F done, backward (zero-bubble: W) not yet run."""
    if schedule == "gpipe":
        return m * v
    if schedule == "1f1b" and v > 1:
        return min(v * p + p - 1, m * v)
    return min(p, m) * v  # 1F1B, ZB-H1, ZB-V (2p passes of half a stage)


def peak_stage_microbatches(schedule: str, p: int, m: int, v: int = 1) -> float:
    """The same in micro-batches of a whole stage's activations (p for 1F1B)."""
    return peak_passes_in_flight(schedule, p, m, v) / v
