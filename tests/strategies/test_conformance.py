"""Conformance: every registered strategy satisfies the universal contract and the properties it declares.

The strategy lists are read from the registry at collection time, so a strategy registered later
(built in or plugin) is covered without touching this file. Each declared
:class:`~gradsurg.Property` has one checker below; :func:`test_every_property_has_a_checker` makes
adding a property without a checker fail.

Strategies are built with their default options and called directly on a matrix (structural
requirements such as ``lora_factor_groups`` only concern the Surgeon; a direct call starts from the
initial state). Strategies that need the task losses get positive losses that follow their rows
(permuted with them; all equal when zero rows are inserted). For randomized strategies both sides of a
comparison use generators in the same state.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradsurg as gs
from gradsurg import Property
from gradsurg.strategies.base import Need
from tests.hyp import (
    aligned_sets,
    any_gradient_matrix,
    assert_close_scaled,
    assert_in_row_span,
    assert_positive_multiple,
    generic_matrices,
    matrices_with_zero_rows,
    one_task,
    seeded,
)

NAMES = gs.list_strategies()
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
SEED = st.integers(0, 2**32 - 1)
# Every check runs once per registered strategy (two dozen and counting): fewer examples each than the
# profile's default (15 of 50; 300 of 1000 with HYPOTHESIS_PROFILE=thorough) keeps the whole file fast.
per_strategy = settings(max_examples=max(10, settings().max_examples * 3 // 10))


def declaring(prop: str) -> list[str]:
    """The registered strategies that declare ``prop``."""
    return [name for name in NAMES if prop in gs.strategy_info(name).properties]


def task_losses(tasks: int) -> torch.Tensor:
    """Distinct positive losses, one per task (only passed to strategies that need losses)."""
    return 1.0 + torch.arange(tasks, dtype=torch.float64) / tasks


def run(name: str, grads: torch.Tensor, seed: int, losses: torch.Tensor | None = None) -> torch.Tensor:
    strategy = gs.get_strategy(name)
    if Need.LOSSES in strategy.needs:
        losses = task_losses(grads.shape[0]) if losses is None else losses
        return strategy(grads, generator=seeded(seed), losses=losses.to(grads.device))
    return strategy(grads, generator=seeded(seed))


CHECKED = {
    Property.SCALE_EQUIVARIANT,
    Property.ONE_TASK_IDENTITY,
    Property.ONE_TASK_POSITIVE,
    Property.PERMUTATION_INVARIANT,
    Property.SUM_WITHOUT_CONFLICT,
    Property.ZERO_ROWS_IGNORED,
    Property.IN_ROW_SPAN,
    Property.RANDOMIZED,
}


def test_every_property_has_a_checker() -> None:
    assert Property.ALL == CHECKED


def test_registry_is_not_empty() -> None:
    assert {"sum", "mean", "pcgrad", "cagrad", "ortho_lora"} <= set(NAMES)


# ---------------------------------------------------------------------------------- universal contract
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
@per_strategy
@given(grads=any_gradient_matrix(), seed=SEED)
def test_universal_contract(name: str, device: str, grads: torch.Tensor, seed: int) -> None:
    """Shape [n], dtype and device of the input, input untouched, finite, a function of the generator state."""
    grads = grads.to(device)
    before = grads.clone()
    out = run(name, grads, seed)
    assert out.shape == (grads.shape[1],)
    assert out.dtype == grads.dtype
    assert out.device == grads.device
    assert torch.equal(grads, before), "the strategy modified its input"
    assert bool(torch.isfinite(out).all()), f"non-finite output {out} on finite input"
    assert torch.equal(out, run(name, grads, seed)), "same generator state must give a bit-identical result"


@pytest.mark.parametrize("name", NAMES)
def test_universal_contract_on_a_non_contiguous_view(name: str) -> None:
    grads = torch.randn(6, 3, generator=seeded(0), dtype=torch.float64)
    view = grads.T  # [3, 6], not contiguous
    assert torch.equal(run(name, view, 1), run(name, view.contiguous(), 1))


# ---------------------------------------------------------------------------------- declared properties
@pytest.mark.parametrize("name", declaring(Property.SCALE_EQUIVARIANT))
@per_strategy
@given(grads=any_gradient_matrix(), alpha=st.floats(1e-2, 1e2), seed=SEED)
def test_scale_equivariant(name: str, grads: torch.Tensor, alpha: float, seed: int) -> None:
    """f(αG) = α f(G) for α > 0."""
    scaled = run(name, grads * alpha, seed)
    assert_close_scaled(scaled, alpha * run(name, grads, seed).double(), like=grads * alpha, factor=4)


@pytest.mark.parametrize("name", declaring(Property.ONE_TASK_IDENTITY))
@per_strategy
@given(grads=one_task(), seed=SEED)
def test_one_task_identity(name: str, grads: torch.Tensor, seed: int) -> None:
    """f(g) = g for one task."""
    assert_close_scaled(run(name, grads, seed), grads[0], like=grads)


@pytest.mark.parametrize("name", declaring(Property.ONE_TASK_POSITIVE))
@per_strategy
@given(grads=one_task(), seed=SEED)
def test_one_task_positive(name: str, grads: torch.Tensor, seed: int) -> None:
    """f(g) = βg with β > 0 for one task (0 for g = 0)."""
    assert_positive_multiple(run(name, grads, seed), grads[0])


@pytest.mark.parametrize("name", declaring(Property.PERMUTATION_INVARIANT))
@per_strategy
@given(grads=any_gradient_matrix(), data=st.data(), seed=SEED)
def test_permutation_invariant(name: str, grads: torch.Tensor, data: st.DataObject, seed: int) -> None:
    """Reordering the tasks does not change the result."""
    order = list(data.draw(st.permutations(range(grads.shape[0]))))
    losses = task_losses(grads.shape[0])
    permuted = run(name, grads[order], seed, losses[order])
    assert_close_scaled(permuted, run(name, grads, seed, losses), like=grads, factor=4)


@pytest.mark.parametrize("name", declaring(Property.SUM_WITHOUT_CONFLICT))
@per_strategy
@given(grads=aligned_sets(), seed=SEED)
def test_sum_without_conflict(name: str, grads: torch.Tensor, seed: int) -> None:
    """With every gᵢ·gⱼ ≥ 0, f(G) = Σᵢ gᵢ."""
    assert_close_scaled(run(name, grads, seed), grads.double().sum(dim=0), like=grads)


def _zero_row_inputs(name: str) -> st.SearchStrategy[tuple[torch.Tensor, torch.Tensor]]:
    # A randomized strategy draws its random order for the number of rows it is given, so adding a
    # row changes the draws: the property is checked where the order cannot matter (≤ 2 real tasks).
    randomized = Property.RANDOMIZED in gs.strategy_info(name).properties
    return matrices_with_zero_rows(generic_matrices(tasks=st.integers(1, 2 if randomized else 5)))


@pytest.mark.parametrize("name", declaring(Property.ZERO_ROWS_IGNORED))
@per_strategy
@given(data=st.data(), seed=SEED)
def test_zero_rows_ignored(name: str, data: st.DataObject, seed: int) -> None:
    """Appending all-zero task gradients does not change the result."""
    with_zeros, grads = data.draw(_zero_row_inputs(name))
    # Equal losses for every task, so that which rows were inserted does not matter to them.
    ones = torch.ones(with_zeros.shape[0], dtype=torch.float64)
    expected = run(name, grads, seed, ones[: grads.shape[0]])
    assert_close_scaled(run(name, with_zeros, seed, ones), expected, like=grads)


@pytest.mark.parametrize("name", declaring(Property.IN_ROW_SPAN))
@per_strategy
@given(grads=any_gradient_matrix(), seed=SEED)
def test_in_row_span(name: str, grads: torch.Tensor, seed: int) -> None:
    """The result is a linear combination of the task gradients."""
    assert_in_row_span(run(name, grads, seed), grads, factor=4)


def _three_conflicting_tasks() -> torch.Tensor:
    """Three gradients at 120° from each other (every pair conflicts), of different norms."""
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    return torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)


@pytest.mark.parametrize("name", declaring(Property.RANDOMIZED))
def test_randomized_depends_on_the_generator(name: str) -> None:
    """A randomized strategy gives different results for different generator states."""
    grads = _three_conflicting_tasks()
    results = {tuple(run(name, grads, seed).tolist()) for seed in range(32)}
    assert len(results) > 1


@pytest.mark.parametrize("name", [n for n in NAMES if n not in declaring(Property.RANDOMIZED)])
@per_strategy
@given(grads=any_gradient_matrix(), seeds=st.tuples(SEED, SEED).filter(lambda s: s[0] != s[1]))
def test_deterministic_ignores_the_generator(name: str, grads: torch.Tensor, seeds: tuple[int, int]) -> None:
    """A strategy that does not declare ``randomized`` does not depend on the generator at all."""
    assert torch.equal(run(name, grads, seeds[0]), run(name, grads, seeds[1]))
