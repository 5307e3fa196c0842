"""The simplex solvers: the CAGrad dual (exact active-set formula and its large-``T`` path) against SciPy's
SLSQP and against the enumeration of every face, and the Euclidean projection onto the simplex."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from gradsurg.strategies import solvers
from gradsurg.strategies.cagrad import CAGrad
from gradsurg.strategies.solvers import (
    EXACT_MAX_TASKS,
    minimize_cagrad_dual,
    project_simplex,
    simplex_faces,
)
from tests.hyp import generic_matrices, matrices_with_zero_rows, rank_deficient, separated_from_zero

optimize = pytest.importorskip("scipy.optimize")

_TASKS = st.integers(2, 16)
_WIDTH = st.integers(17, 24)  # more columns than tasks: a generic Gram matrix is positive definite
_ITERATIONS = CAGrad().iterations  # the default the strategy uses above EXACT_MAX_TASKS (None: T steps)


def _problem(grads: Tensor, c: float) -> tuple[Tensor, Tensor, Tensor]:
    """``K``, ``b`` and ``φ`` of CAGrad's dual, built exactly as :meth:`CAGrad.dual_weights` does."""
    gram = grads.double() @ grads.double().T
    scale = gram.diagonal().mean()
    k = gram / torch.where(scale > 0, scale, torch.ones_like(scale))
    return k, k.mean(dim=-1), c * k.mean().clamp_min(0).sqrt().reshape(1)


def _objective(w: np.ndarray, k: np.ndarray, b: np.ndarray, phi: float) -> float:
    return float(b @ w + phi * np.sqrt(max(float(w @ k @ w), 0.0)))


def _slsqp(k: Tensor, b: Tensor, phi: Tensor) -> np.ndarray:
    kn, bn, p = k.numpy(), b.numpy(), float(phi)
    tasks = len(bn)
    result = optimize.minimize(
        lambda w: _objective(w, kn, bn, p),
        np.full(tasks, 1.0 / tasks),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * tasks,
        constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0},),
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    return np.asarray(result.x)


def _direction(grads: Tensor, w: Tensor, c: float) -> Tensor:
    """CAGrad's ``d = g₀ + (φ/‖g_w‖) g_w`` for dual weights ``w``."""
    g = grads.double()
    g0 = g.mean(dim=0)
    gw = w.double() @ g
    return g0 + c * g0.norm() / gw.norm() * gw


@settings(max_examples=25)
@given(
    grads=separated_from_zero(tasks=_TASKS, width=_WIDTH, dtype=st.just(torch.float64)),
    c=st.sampled_from([0.1, 0.4, 0.8, 2.0]),
)
def test_direction_matches_slsqp_on_generic_inputs(grads: Tensor, c: float) -> None:
    k, b, phi = _problem(grads, c)
    ours = minimize_cagrad_dual(k, b, phi, iterations=_ITERATIONS)
    reference = torch.from_numpy(_slsqp(k, b, phi))
    assert float(ours.min()) >= 0 and abs(float(ours.sum()) - 1) < 1e-12
    expected = _direction(grads, reference, c)
    assert float((_direction(grads, ours, c) - expected).norm()) <= 1e-4 * float(expected.norm())
    # never worse than SLSQP (up to rounding): the direction difference is SLSQP's tolerance, not ours
    kn, bn = k.numpy(), b.numpy()
    assert _objective(ours.numpy(), kn, bn, float(phi)) <= _objective(reference.numpy(), kn, bn, float(phi)) + 1e-12


@pytest.mark.parametrize("stop_early", [True, False], ids=["early-stop", "all-steps"])
@settings(max_examples=25)
@given(grads=rank_deficient(tasks=st.integers(3, 24), dtype=st.just(torch.float64)), c=st.sampled_from([0.4, 2.0]))
def test_objective_no_worse_than_slsqp_when_rank_deficient(grads: Tensor, c: float, stop_early: bool) -> None:
    k, b, phi = _problem(grads, c)
    ours = minimize_cagrad_dual(k, b, phi, iterations=_ITERATIONS, stop_early=stop_early)
    kn, bn = k.numpy(), b.numpy()
    found = _objective(ours.numpy(), kn, bn, float(phi))
    # rank-deficient faces are solved with a tiny ridge: near g_w = 0 the objective is within ~sqrt(ridge)
    assert found <= _objective(_slsqp(k, b, phi), kn, bn, float(phi)) + 1e-6


@pytest.mark.parametrize("tasks", [4, EXACT_MAX_TASKS + 2])
def test_batched_solution_equals_one_at_a_time(tasks: int) -> None:
    generator = torch.Generator().manual_seed(tasks)
    problems = [_problem(torch.randn(tasks, 3 * tasks, generator=generator), 0.5) for _ in range(6)]
    k, b, phi = (torch.stack(parts).unflatten(0, (2, 3)) for parts in zip(*problems))  # two leading dimensions
    batched = minimize_cagrad_dual(k, b, phi, iterations=_ITERATIONS).flatten(0, 1)
    for index, (ki, bi, phii) in enumerate(problems):
        torch.testing.assert_close(batched[index], minimize_cagrad_dual(ki, bi, phii, iterations=_ITERATIONS))


def _enumerated(k: Tensor, b: Tensor, phi: Tensor) -> Tensor:
    """The solution of the exact enumeration of every face, whatever ``T`` (slow above 12 tasks)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(solvers, "EXACT_MAX_TASKS", k.shape[-1])
        return minimize_cagrad_dual(k, b, phi, iterations=_ITERATIONS)


@settings(max_examples=25)
@given(
    grads=separated_from_zero(tasks=st.integers(EXACT_MAX_TASKS + 1, 13), width=_WIDTH, dtype=st.just(torch.float64)),
    c=st.sampled_from([0.1, 0.4, 0.8, 2.0]),
)
def test_above_the_threshold_the_active_set_reaches_the_optimum_of_every_face(grads: Tensor, c: float) -> None:
    """Above EXACT_MAX_TASKS the warm start and active-set steps land on the optimum the enumeration finds."""
    k, b, phi = _problem(grads, c)
    ours, exact = minimize_cagrad_dual(k, b, phi, iterations=_ITERATIONS), _enumerated(k, b, phi)
    kn, bn = k.numpy(), b.numpy()
    assert _objective(ours.numpy(), kn, bn, float(phi)) <= _objective(exact.numpy(), kn, bn, float(phi)) + 1e-12
    torch.testing.assert_close(_direction(grads, ours, c), _direction(grads, exact, c), rtol=1e-9, atol=0)


@settings(max_examples=25)
@given(
    grads=st.one_of(
        separated_from_zero(tasks=st.integers(EXACT_MAX_TASKS + 1, 20), width=_WIDTH, dtype=st.just(torch.float64)),
        rank_deficient(tasks=st.integers(EXACT_MAX_TASKS + 1, 20), dtype=st.just(torch.float64)),
    ),
    c=st.sampled_from([0.1, 0.4, 2.0]),
)
def test_early_stop_ends_at_the_optimum_of_all_steps(grads: Tensor, c: float) -> None:
    """The CPU early stop (optimality conditions to 1e-10 of max|b| + φ√(max diag K)) loses nothing against
    running every step, as a device run does."""
    k, b, phi = _problem(grads, c)
    early = minimize_cagrad_dual(k, b, phi, stop_early=True)
    full = minimize_cagrad_dual(k, b, phi, stop_early=False)
    kn, bn = k.numpy(), b.numpy()
    scale = float(b.abs().max() + phi * k.diagonal().max().sqrt())
    assert _objective(early.numpy(), kn, bn, float(phi)) <= _objective(full.numpy(), kn, bn, float(phi)) + 1e-9 * scale


@settings(max_examples=25)
@given(
    pair=matrices_with_zero_rows(
        generic_matrices(tasks=st.integers(9, 11), width=st.integers(1, 12)), st.integers(1, 3)
    ),
    c=st.sampled_from([0.0, 0.4, 2.0]),
)
def test_above_the_threshold_degenerate_inputs_stay_on_the_simplex(pair: tuple[Tensor, Tensor], c: float) -> None:
    """Zero rows, all-zero matrices, rank-deficient K and c = 0: a point of the simplex, near the optimum."""
    k, b, phi = _problem(pair[0].double(), c)
    ours = minimize_cagrad_dual(k, b, phi, iterations=_ITERATIONS)
    _assert_on_simplex(ours)
    kn, bn = k.numpy(), b.numpy()
    found = _objective(ours.numpy(), kn, bn, float(phi))
    assert found <= _objective(_enumerated(k, b, phi).numpy(), kn, bn, float(phi)) + 1e-6


def test_faces_enumerate_every_nonempty_subset_once() -> None:
    faces = simplex_faces(4)
    assert faces.shape == (15, 4)
    assert len({tuple(row.tolist()) for row in faces}) == 15 and bool((faces.sum(dim=-1) > 0).all())


def test_cagrad_weights_use_the_exact_solver_below_the_threshold() -> None:
    grads = torch.tensor([[1.0, 0.0, 0.2], [-0.6, 1.0, 0.0], [0.1, -0.8, 1.0]], dtype=torch.float64)
    strategy = CAGrad(c=0.5, iterations=1)  # one iteration would be far from optimal: the formula does not iterate
    k, b, phi = _problem(grads, 0.5)
    expected = _direction(grads, torch.from_numpy(_slsqp(k, b, phi)), 0.5) / (1 + 0.5**2)
    torch.testing.assert_close(strategy(grads), expected, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------------- projection
_VECTORS = generic_matrices(tasks=st.integers(1, 4), width=st.integers(1, 8), dtype=st.just(torch.float64))


def _assert_on_simplex(w: Tensor) -> None:
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(w.shape[:-1], dtype=w.dtype), rtol=0, atol=1e-12)


@given(v=_VECTORS, shift=st.floats(-100, 100))
def test_projection_is_on_the_simplex_and_satisfies_the_optimality_condition(v: Tensor, shift: float) -> None:
    """p = P(v) iff p ∈ Δ and (v − p)·(q − p) ≤ 0 for every q ∈ Δ, i.e. for every vertex eₖ."""
    v = v + shift
    p = project_simplex(v)
    _assert_on_simplex(p)
    residual = v - p
    slack = residual - (residual * p).sum(dim=-1, keepdim=True)  # (v − p)·(eₖ − p)
    assert bool((slack <= 1e-9 * (1 + v.abs().max())).all())


@given(v=_VECTORS)
def test_projection_is_idempotent_and_batched(v: Tensor) -> None:
    p = project_simplex(v)
    torch.testing.assert_close(project_simplex(p), p, rtol=0, atol=1e-12)
    for row, projected in zip(v, p):
        torch.testing.assert_close(project_simplex(row), projected, rtol=0, atol=0)
