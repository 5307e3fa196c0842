"""CAGrad against the official algorithm (Cranial-XIX/CAGrad): SLSQP on the simplex from a uniform start.

``official_cagrad`` is the official ``cagrad`` function transcribed to NumPy with the task gradients
as rows: ``A = G Gᵀ``, ``b = 1/T``, ``c = α√(mean A + 1e-8) + 1e-8``, minimise
``x·A·b + c √(x·A·x + 1e-8)`` over the simplex with SLSQP from uniform ``x``, then
``d = g₀ + c/(‖g_w‖ + 1e-8) g_w`` divided by 1, ``1 + α²`` or ``1 + α`` (rescale 0/1/2).

SLSQP runs with ``ftol=1e-12``: with the default ``ftol=1e-6`` the official solver itself stops
early; on these inputs its direction then differs from the converged one by up to ~1e-3 relative
(measured: 5e-5 to 1.2e-3 over random 3–5 task problems with unit-norm rows), which would hide a
1e-4 disagreement.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from torch import Tensor

from gradsurg.strategies import CAGrad
from gradsurg.strategies.base import Context
from tests.hyp import (
    assert_close_scaled,
    generic_matrices,
    one_task,
    separated_from_zero,
    zero_in_hull,
)

F64 = st.just(torch.float64)
C = st.floats(0.0, 2.0)
RESCALES = [0, 1, 2]
# Each CAGrad call solves a small dual problem: the secondary checks need fewer examples.
few = settings(max_examples=max(10, settings().max_examples // 2))
DIVISOR = {0: lambda c: 1.0, 1: lambda c: 1.0 + c**2, 2: lambda c: 1.0 + c}


def official_weights(gram: np.ndarray, alpha: float, *, require_success: bool = True) -> np.ndarray:
    """The official dual solve: SLSQP on the simplex from uniform weights (tight ``ftol``)."""
    tasks = gram.shape[0]
    x_start = np.ones(tasks) / tasks
    b = x_start.copy()
    c = alpha * np.sqrt(gram.mean() + 1e-8) + 1e-8

    def objective(x: np.ndarray) -> float:
        return float(x @ gram @ b + c * np.sqrt(x @ gram @ x + 1e-8))

    result = minimize(
        objective,
        x_start,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * tasks,
        constraints={"type": "eq", "fun": lambda x: 1.0 - x.sum()},
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    assert result.success or not require_success, result.message
    return np.asarray(result.x)


def official_cagrad(grads: Tensor, alpha: float, rescale: int) -> Tensor:
    """The official direction for ``grads`` (rows are tasks), in float64."""
    g = grads.double().numpy()
    gram = g @ g.T
    w = official_weights(gram, alpha)
    c = alpha * np.sqrt(gram.mean() + 1e-8) + 1e-8
    gw = w @ g
    d = g.mean(axis=0) + c / (np.linalg.norm(gw) + 1e-8) * gw
    return torch.from_numpy(d / DIVISOR[rescale](alpha))


def dual_objective(gram: Tensor, w: Tensor, c: float) -> float:
    """The scale-free dual ``g_wᵀg₀ + c‖g₀‖‖g_w‖`` (no smoothing constants)."""
    gram = gram.double()
    w = w.double()
    tasks = gram.shape[0]
    return float(w @ gram.sum(dim=1) / tasks + c * gram.mean().clamp_min(0).sqrt() * (w @ gram @ w).clamp_min(0).sqrt())


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@given(grads=separated_from_zero(dtype=F64), c=C, rescale=st.sampled_from(RESCALES))
def test_matches_official_slsqp_on_generic_inputs(grads: Tensor, c: float, rescale: int) -> None:
    """Where 0 is outside the hull the dual optimum is unique: the directions agree to 1e-4 relative."""
    ours = CAGrad(c=c, rescale=rescale)(grads)
    assert relative_error(ours, official_cagrad(grads, c, rescale)) <= 1e-4


@given(grads=zero_in_hull(dtype=F64), c=C)
def test_degenerate_inputs_reach_the_dual_optimum(grads: Tensor, c: float) -> None:
    """With 0 in the hull the direction need not be unique: compare the dual objective instead.

    SLSQP gets the Gram matrix normalised to unit mean diagonal (the minimiser does not depend on the
    scale, and the official ``1e-8`` constants assume gradients of norm ≈ 1); it may stop with
    "positive directional derivative" at these kinks, so only its objective value is used.
    """
    gram = grads @ grads.T
    unit = gram / gram.diagonal().mean()
    ours = dual_objective(unit, CAGrad(c=c).dual_weights(gram), c)
    slsqp = dual_objective(unit, torch.from_numpy(official_weights(unit.numpy(), c, require_success=False)), c)
    assert ours <= slsqp + 1e-6
    assert bool(torch.isfinite(CAGrad(c=c)(grads)).all())


@few
@given(grads=st.one_of(separated_from_zero(), zero_in_hull(), generic_matrices()), c=C)
def test_dual_weights_lie_on_the_simplex(grads: Tensor, c: float) -> None:
    w = CAGrad(c=c).dual_weights((grads @ grads.T).double())
    assert bool((w >= 0).all())
    assert abs(float(w.sum()) - 1.0) <= 1e-12


@few
@given(grads=st.one_of(separated_from_zero(), generic_matrices()), c=C)
def test_rescale_modes_and_sum_scale(grads: Tensor, c: float) -> None:
    """rescale=0 → d, 1 → d/(1+c²), 2 → d/(1+c); scale="sum" multiplies by T. In float64: near 0 in the hull
    the direction is a float32 cancellation (weights ~ 1/‖g_w‖ on nearly opposite rows), rounded differently
    for each scale."""
    grads = grads.double()
    plain = CAGrad(c=c, rescale=0)(grads)
    for rescale in (1, 2):
        expected = plain / DIVISOR[rescale](c)
        assert_close_scaled(CAGrad(c=c, rescale=rescale)(grads), expected, like=grads)
    tasks = grads.shape[0]
    assert_close_scaled(CAGrad(c=c, rescale=0, scale="sum")(grads), tasks * plain, like=grads * tasks)


@pytest.mark.parametrize("tasks", [3, 12], ids=["enumeration", "active-set"])
def test_weights_are_computed_without_reading_device_values(tasks: int) -> None:
    """On the meta device (shapes, no values) any ``.item()``, ``bool(tensor)`` or data-dependent branch
    would raise: the weights of a batch of Gram matrices are computed without a host synchronisation."""
    gram = torch.empty(2, 3, tasks, tasks, dtype=torch.float64, device="meta")
    weights = CAGrad(c=0.4).weights(gram, Context())
    assert weights.shape == (2, 3, tasks)
    assert weights.device.type == "meta"


@few
@given(grads=one_task(), c=C, rescale=st.sampled_from(RESCALES))
def test_one_task_closed_form(grads: Tensor, c: float, rescale: int) -> None:
    """T = 1: g_w = g₀ = g, so d = g (1 + c) / divisor."""
    expected = grads[0].double() * (1 + c) / DIVISOR[rescale](c)
    assert_close_scaled(CAGrad(c=c, rescale=rescale)(grads), expected, like=grads * (1 + c))


@few
@given(grads=generic_matrices(), rescale=st.sampled_from(RESCALES))
def test_c_zero_is_the_mean(grads: Tensor, rescale: int) -> None:
    assert_close_scaled(CAGrad(c=0.0, rescale=rescale)(grads), grads.double().mean(dim=0), like=grads)


# ---------------------------------------------------------------------------------- the primal problem
def primal_gap(grads: Tensor, c: float) -> tuple[float, float]:
    """How far ``d`` (rescale=0) is from solving ``max_d minᵢ gᵢ·d s.t. ‖d − g₀‖ ≤ c‖g₀‖``.

    Returns ``(D − minᵢ gᵢ·d, ‖d − g₀‖ − c‖g₀‖)`` relative to the mean squared row norm, where ``D``
    is the dual optimum (= the primal optimum, by strong duality).
    """
    strategy = CAGrad(c=c, rescale=0)
    grads = grads.double()
    gram = grads @ grads.T
    direction = strategy(grads).double()
    optimum = dual_objective(gram, strategy.dual_weights(gram), c)
    g0 = grads.mean(dim=0)
    scale = float(gram.diagonal().mean())
    gap = (optimum - float((grads @ direction).min())) / scale
    return gap, float((direction - g0).norm() - c * g0.norm()) / scale**0.5


@given(grads=separated_from_zero(dtype=F64), c=C)
def test_direction_solves_the_primal_problem(grads: Tensor, c: float) -> None:
    """The direction is in the ball and its worst task improvement equals the dual optimum."""
    gap, outside = primal_gap(grads, c)
    assert gap <= 1e-9
    assert outside <= 1e-9


@pytest.mark.parametrize(
    "rows",
    [[[1.0], [-2.0]], [[3.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]]],
    ids=["opposite-pair", "three-in-the-plane"],
)
def test_degenerate_direction_solves_the_primal_problem(rows: list[list[float]]) -> None:
    """With 0 in the hull and c ≥ 1 the dual optimum is g_w* = 0 (value 0) and d = 0 solves the primal.

    The solver stops at a rounding-level g_w, whose direction is meaningless: without the degenerate
    case, the pair's direction came out as g₀ + φ·(+1) = 0.25, whose worst task improvement is −0.5.
    """
    gap, _ = primal_gap(torch.tensor(rows, dtype=torch.float64), 1.5)
    assert gap <= 1e-6
