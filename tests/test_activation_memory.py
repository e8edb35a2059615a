"""Activation memory: Korthikanti et al. 2022's formulas (nanomt.memory).

The term-by-term formulas reduce to the paper's closed forms at 16 bits with dropout (no
parallelism, tp, tp + sequence parallelism, selective and full recompute).
"""

from __future__ import annotations

import pytest

from nanomt.memory import activation_bytes_per_layer, activation_terms

SHAPES = [(2048, 1, 20480, 128), (1024, 4, 256, 8), (256, 2, 64, 4)]  # (s, b, h, a)


def per_layer(s: int, b: int, h: int, a: int, **kw) -> float:
    return activation_bytes_per_layer(s, b, h, a, **kw)


# ---- the formulas against the paper's closed forms (bf16, dropout) ------------------------------
@pytest.mark.parametrize("s,b,h,a", SHAPES)
@pytest.mark.parametrize("t", [1, 2, 8])
def test_formulas_reduce_to_the_papers_closed_forms(s, b, h, a, t):
    sbh = s * b * h
    assert per_layer(s, b, h, a) == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert per_layer(s, b, h, a, tp=t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert per_layer(s, b, h, a, tp=t, sequence_parallel=True) == pytest.approx(
        sbh / t * (34 + 5 * a * s / h))
    assert per_layer(s, b, h, a, tp=t, recompute="selective") == pytest.approx(
        sbh * (10 + 24 / t))
    assert per_layer(s, b, h, a, tp=t, sequence_parallel=True, recompute="selective") == \
        pytest.approx(34 * sbh / t)
    assert per_layer(s, b, h, a, tp=t, recompute="full") == pytest.approx(2 * sbh)
    assert per_layer(s, b, h, a, tp=t, sequence_parallel=True, recompute="full") == \
        pytest.approx(2 * sbh / t)


@pytest.mark.parametrize("s,b,h,a", SHAPES)
def test_dropout_flash_and_element_size(s, b, h, a):
    """Without dropout the three masks and the dropout output go; flash keeps no s^2 matrix
    but an fp32 log-sum-exp per row; every non-mask term scales with the element size."""
    sbh, t = s * b * h, 4
    no_dropout = per_layer(s, b, h, a, tp=t, dropout=False)
    assert no_dropout == pytest.approx(sbh * (8 + 24 / t + 2 * a * s / (h * t)))
    flash = per_layer(s, b, h, a, tp=t, dropout=False, flash=True)
    assert flash == pytest.approx(sbh * (8 + 24 / t) + 4 * a * s * b / t)
    fp32 = per_layer(s, b, h, a, tp=t, sequence_parallel=True, bytes_per_element=4)
    assert fp32 == pytest.approx(sbh / t * (66 + 9 * a * s / h))  # masks stay 1 byte
    terms = activation_terms(s, b, h, a, tp=t, sequence_parallel=True)
    assert len(terms) == 14 and all(value > 0 for value in terms.values())
    assert activation_terms(s, b, h, a, ffn_hidden=8 * h)["gelu input"] == 2 * 8 * s * b * h
    with pytest.raises(ValueError, match="recompute"):
        per_layer(s, b, h, a, recompute="sometimes")
