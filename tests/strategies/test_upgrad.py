"""UPGrad and DualProj: the dual-cone projections, against TorchJD/quadprog, and the shared QP solver."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradsurg as gs
from gradsurg.strategies import qp
from gradsurg.strategies.base import Context
from gradsurg.strategies.dualproj import DualProj
from gradsurg.strategies.upgrad import UPGrad
from tests.hyp import aligned_sets, any_gradient_matrix, assert_close_scaled
from tests.strategies.qp_helpers import (
    FULL_RANK_SHAPES,
    assert_batched_weights_match,
    assert_invalid,
    assert_surgeon_batched_equals_looped,
    full_rank,
    relative_error,
)

STRATEGIES = [UPGrad, DualProj]


def _torchjd(cls: type, *, exact: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    pytest.importorskip("qpsolvers")
    from torchjd._linalg import QuadprogProjector

    projector = QuadprogProjector(norm_eps=0.0, reg_eps=1e-13) if exact else None
    aggregator: Callable[[torch.Tensor], torch.Tensor] = getattr(aggregation, cls.__name__)(projector=projector)
    return aggregator


@pytest.mark.parametrize("cls", STRATEGIES)
@pytest.mark.parametrize(("tasks", "width"), FULL_RANK_SHAPES)
def test_matches_torchjd_quadprog(cls: type, tasks: int, width: int) -> None:
    """Unregularised quadprog (full-rank inputs): 1e-7 relative; TorchJD defaults (K/tr K + 1e-4 I): 1e-2."""
    grads = full_rank(tasks * 7 + width, tasks, width)
    ours = cls()(grads)
    assert relative_error(ours, _torchjd(cls, exact=True)(grads), grads) < 1e-7
    assert relative_error(ours, _torchjd(cls, exact=False)(grads), grads) < 1e-2


@pytest.mark.parametrize("cls", STRATEGIES)
@given(grads=any_gradient_matrix(dtype=st.just(torch.float64)))
def test_result_conflicts_with_no_task(cls: type, grads: torch.Tensor) -> None:
    """The defining property: gᵢ·d ≥ 0 for every task (to 1e-9 relative), up to the documented rank cut-off.

    The QP is solved on ``K`` with its eigenvalues below ``m·RANK_RTOL·λ_max`` set to zero (``K̃ = K − E``),
    so with ``d = Gᵀw``: ``gᵢ·d = (K̃w)ᵢ + (Ew)ᵢ ≥ −‖E‖‖w‖``; ``‖E‖`` is the largest eigenvalue cut.
    """
    output = cls().apply(grads, Context())
    assert output.weights is not None
    gram = grads @ grads.T
    eigenvalues = torch.linalg.eigvalsh(gram)
    nonzero = (gram.diagonal() != 0).sum()
    cut = eigenvalues[eigenvalues <= eigenvalues[-1].clamp_min(0) * nonzero * qp.RANK_RTOL].abs()
    slack = (cut.max() if cut.numel() else 0.0) * output.weights.norm()
    norms = grads.norm(dim=1)
    assert bool((grads @ output.direction >= -(1e-9 * norms * norms.sum() + slack)).all())


def test_upgrad_projects_each_gradient() -> None:
    """Every projected row is in the dual cone, and no closer point of the cone exists along it (KKT)."""
    grads = full_rank(11, 5, 3)  # rank deficient: 5 tasks in 3 dimensions
    gram = grads @ grads.T
    v = qp.project_dual_cone(gram, torch.eye(5, dtype=torch.float64))
    k_v = v @ gram  # row i: K vᵢ = G (projection of gᵢ)
    scale = float(gram.diagonal().max())
    assert float(k_v.min()) >= -1e-10 * scale  # in the dual cone
    slack = v - torch.eye(5, dtype=torch.float64)
    assert float(slack.min()) >= -1e-12  # v ≥ u
    assert float((slack * k_v).abs().max()) <= 1e-10 * scale  # complementarity


@pytest.mark.parametrize("cls", STRATEGIES)
@given(grads=aligned_sets(dtype=st.just(torch.float64)))
def test_without_conflict_mean_or_sum(cls: type, grads: torch.Tensor) -> None:
    assert_close_scaled(cls()(grads), grads.mean(dim=0), like=grads, factor=10)
    assert_close_scaled(cls(scale="sum")(grads), grads.sum(dim=0), like=grads, factor=10)


@pytest.mark.parametrize("cls", STRATEGIES)
def test_batched_weights(cls: type) -> None:
    assert_batched_weights_match(cls())


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_invalid_options(name: str) -> None:
    assert_invalid(name, scale="median")


def _assert_nnls_matches_scipy(*, definite: bool) -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        # Under- and over-determined; with definite=True only the latter (AᵀA is then positive definite).
        rows, cols = (3, 6) if seed % 2 and not definite else (8, 5)
        a = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
        b = torch.randn(rows, generator=generator, dtype=torch.float64)
        x, residual = qp.nonnegative_least_squares(a.T @ a, a.T @ b, definite=definite)
        expected, _ = scipy_optimize.nnls(a.numpy(), b.numpy())
        assert float(residual) < 1e-12
        torch.testing.assert_close(a @ x, a @ torch.from_numpy(expected), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("definite", [False, True], ids=["single-entries", "block-entries"])
def test_nnls_matches_scipy(definite: bool) -> None:
    """The shared active-set solver against SciPy's NNLS, on least-squares problems in Gram form."""
    _assert_nnls_matches_scipy(definite=definite)


def test_failed_factorisation_falls_back_to_the_pseudo_inverse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cholesky solves that fail (NaN) leave the answer to the pseudo-inverse path, which is still exact."""
    monkeypatch.setattr(qp, "_cholesky_solve", lambda system, rhs, passive: torch.full_like(rhs, torch.nan))
    _assert_nnls_matches_scipy(definite=False)
    _assert_nnls_matches_scipy(definite=True)


def test_projection_of_a_constant_vector() -> None:
    """A number c stands for the vector c·1 (here the mean conflicts with a task, so the projection moves)."""
    grads = full_rank(3, 5, 4)
    grads[0] = -2 * grads[1:].sum(dim=0)
    gram = grads @ grads.T
    mean = torch.full((5,), 0.2, dtype=torch.float64)
    expected = qp.project_dual_cone(gram, mean)
    assert float((expected - mean).max()) > 0.1
    torch.testing.assert_close(qp.project_dual_cone(gram, 0.2), expected, rtol=0, atol=1e-15)


def test_unconverged_solver_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qp, "TOLERANCE", -1.0)
    with pytest.warns(gs.GradSurgWarning, match="residual"):
        UPGrad()(full_rank(0, 3, 4))


def test_converged_solver_is_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UPGrad()(full_rank(0, 6, 3).float())


def test_surgeon_batched_groups_equal_looped_groups() -> None:
    assert_surgeon_batched_equals_looped(UPGrad())
    assert_surgeon_batched_equals_looped(DualProj())
