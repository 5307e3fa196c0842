"""Ortho-LoRA: PCGrad inside each LoRA factor, one task order per step.

The strategy is checked on hypothesis-built LoRA-shaped gradients against a plain, exact-arithmetic
transcription of Algorithm 1 (``tests.adapters.lora_helpers.plain_pcgrad``); the PEFT and Surgeon
side is in ``tests/adapters/test_peft.py``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import gradsurg as gs
from gradsurg import Requirement
from gradsurg.strategies import OrthoLoRA, PCGrad
from gradsurg.strategies.projection import projection_coefficients
from tests.adapters.lora_helpers import plain_pcgrad
from tests.hyp import (
    assert_close_scaled,
    conflicting_pairs,
    generic_matrices,
    lora_factor_gradients,
    magnitude,
    matrices_with_zero_rows,
    seeded,
)

F64 = st.just(torch.float64)
SEEDS = st.integers(0, 2**32 - 1)
REFERENCES = st.sampled_from(("original", "sequential"))
# Exact-arithmetic reference vs Gram-space float64: a few hundred ulps of the input's size.
FACTOR = 100.0


def projected(strategy: OrthoLoRA, grads: torch.Tensor, seed: int) -> torch.Tensor:
    """The library's projected task gradients ``gᵢ'`` (rows of ``C G``) for the order ``seed`` draws."""
    outer, partners = strategy.task_orders(grads.shape[0], seeded(seed))
    coefficients = projection_coefficients(grads @ grads.T, partners, outer, strategy.options["reference"])
    return coefficients @ grads


# ---------------------------------------------------------------------------------- registry and options
def test_registered_with_its_requirement() -> None:
    info = gs.strategy_info("Ortho-LoRA")
    assert info.cls is OrthoLoRA
    assert info.name == "ortho_lora"
    assert Requirement.LORA_FACTOR_GROUPS in info.requires
    assert "2601.09684" in info.reference
    assert isinstance(gs.get_strategy("ortholora"), OrthoLoRA)


@pytest.mark.parametrize(("option", "value"), [("reference", "projected"), ("shuffle", "yes")])
def test_bad_option_is_refused(option: str, value: object) -> None:
    with pytest.raises(gs.InvalidOptionError, match=f"`{option}` of OrthoLoRA"):
        OrthoLoRA(**{option: value})  # type: ignore[arg-type]


def test_surgeon_refuses_groups_that_are_not_lora_factors() -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(gs.IncompatibleGroupError, match="lora_groups"):
        gs.Surgeon(gs.groups.whole(model), "ortho_lora")


# ---------------------------------------------------------------------------------- the task order
@given(tasks=st.integers(1, 6), seed=SEEDS)
def test_one_order_gives_every_task_the_others_in_that_order(tasks: int, seed: int) -> None:
    outer, partners = OrthoLoRA().task_orders(tasks, seeded(seed))
    order = outer.tolist()
    assert sorted(order) == list(range(tasks))
    for i in range(tasks):
        assert partners[i].tolist() == [j for j in order if j != i]


def test_the_order_is_random_and_seeded() -> None:
    strategy = OrthoLoRA()
    orders = {tuple(strategy.task_orders(3, seeded(seed))[0].tolist()) for seed in range(60)}
    assert orders == set(itertools.permutations(range(3)))
    again = strategy.task_orders(3, seeded(7))[0]
    assert torch.equal(strategy.task_orders(3, seeded(7))[0], again)
    assert OrthoLoRA(shuffle=False).task_orders(3, seeded(7))[0].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------- Algorithm 1
@given(factors=lora_factor_gradients(dtype=F64), seed=SEEDS, reference=REFERENCES)
def test_equals_algorithm_1_factor_by_factor(
    factors: tuple[torch.Tensor, torch.Tensor], seed: int, reference: str
) -> None:
    strategy = OrthoLoRA(reference=reference)  # type: ignore[arg-type]
    for grads in factors:
        order = strategy.task_orders(grads.shape[0], seeded(seed))[0].tolist()
        rows, conditioning = plain_pcgrad(grads, order, reference=reference)
        assume(conditioning > 1e-6)  # the sequential reading is discontinuous where gⱼ' → 0
        direction = strategy(grads, generator=seeded(seed))
        assert_close_scaled(direction, rows.sum(dim=0), like=grads, factor=FACTOR)


@given(grads=generic_matrices(tasks=st.integers(2, 5), dtype=F64), seed=SEEDS)
def test_sequential_equals_the_in_place_loop(grads: torch.Tensor, seed: int) -> None:
    strategy = OrthoLoRA(reference="sequential")
    order = strategy.task_orders(grads.shape[0], seeded(seed))[0].tolist()
    rows, conditioning = plain_pcgrad(grads, order, reference="sequential")
    assume(conditioning > 1e-6)
    assert_close_scaled(strategy(grads, generator=seeded(seed)), rows.sum(dim=0), like=grads, factor=FACTOR)


@given(factors=lora_factor_gradients(), reference=REFERENCES)
def test_in_index_order_equals_pcgrad_on_each_factor(
    factors: tuple[torch.Tensor, torch.Tensor], reference: str
) -> None:
    ortho = OrthoLoRA(reference=reference, shuffle=False)  # type: ignore[arg-type]
    pcgrad = PCGrad(reference=reference, shuffle=False)  # type: ignore[arg-type]
    for grads in factors:
        assert torch.equal(ortho(grads), pcgrad(grads))


@given(a=conflicting_pairs(dtype=F64), b_width=st.integers(1, 6), b_scale=st.integers(-2, 2), seed=SEEDS)
def test_differs_from_pcgrad_on_the_flattened_factors(a: torch.Tensor, b_width: int, b_scale: int, seed: int) -> None:
    """A conflicts, B agrees more strongly: the flattened [A, B] rows do not conflict at all."""
    b1 = torch.linspace(0.5, 1.5, b_width, dtype=torch.float64) * 10.0**b_scale
    beta = 2 * float(-(a[0] @ a[1])) / float(b1 @ b1) + 1.0
    b = torch.stack([b1, beta * b1])
    flat = torch.cat([a, b], dim=1)
    assert float(flat[0] @ flat[1]) > 0
    flattened = PCGrad()(flat, generator=seeded(seed))
    assert torch.equal(flattened, flat.sum(dim=0))  # no conflict: PCGrad on the whole vector is the sum

    exact_a, _ = plain_pcgrad(a, [0, 1])
    # Only a₂ = −a₁ projects to its own sum (zero); conflicting_pairs draws it with n = 1.
    assume(float((exact_a.sum(dim=0) - a.sum(dim=0)).norm()) > 1e-6 * magnitude(a))
    ortho = OrthoLoRA()
    direction_a = ortho(a, generator=seeded(seed))
    direction_b = ortho(b, generator=seeded(seed))
    assert torch.equal(direction_b, b.sum(dim=0))
    gap = float((direction_a - flattened[: a.shape[1]]).norm())
    assert gap > 1e-7 * magnitude(a)


# ---------------------------------------------------------------------------------- what the projection guarantees
@given(grads=conflicting_pairs(dtype=F64), seed=SEEDS)
def test_two_tasks_no_projected_gradient_conflicts_with_the_other_original(grads: torch.Tensor, seed: int) -> None:
    strategy = OrthoLoRA()
    rows = projected(strategy, grads, seed)
    assert_close_scaled(rows.sum(dim=0), strategy(grads, generator=seeded(seed)), like=grads)
    tolerance = 1e-10 * magnitude(grads) ** 2
    assert float(rows[0] @ grads[1]) >= -tolerance
    assert float(rows[1] @ grads[0]) >= -tolerance


@given(grads=generic_matrices(tasks=st.integers(3, 5), dtype=F64), seed=SEEDS)
def test_each_task_ends_without_conflict_with_its_last_partner(grads: torch.Tensor, seed: int) -> None:
    strategy = OrthoLoRA()
    rows = projected(strategy, grads, seed)
    partners = strategy.task_orders(grads.shape[0], seeded(seed))[1]
    tolerance = 1e-10 * magnitude(grads) ** 2
    for i in range(grads.shape[0]):
        assert float(rows[i] @ grads[partners[i, -1]]) >= -tolerance


def test_three_tasks_a_later_projection_can_recreate_a_conflict() -> None:
    """For T ≥ 3 the guarantee above is all there is: here task 0 conflicts again with task 1.

    Order (0, 1, 2): g₀ = (1, 0) conflicts with g₁ = (−1, 1) and becomes (½, ½); that conflicts with
    g₂ = (0.2, −1), and the second projection turns it into ≈ (0.58, 0.12), whose product with g₁
    is ≈ −0.46 < 0.
    """
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.2, -1.0]], dtype=torch.float64)
    strategy = OrthoLoRA(shuffle=False)
    rows = projected(strategy, grads, seed=0)
    exact, _ = plain_pcgrad(grads, [0, 1, 2])
    assert_close_scaled(rows, exact, like=grads)
    assert float(rows[0] @ grads[2]) == pytest.approx(0.0, abs=1e-12)  # its last partner: fine
    assert float(rows[0] @ grads[1]) < -0.4  # an earlier partner: conflicting again


# ---------------------------------------------------------------------------------- zero gradients
@given(pair=matrices_with_zero_rows(generic_matrices(dtype=F64)), reference=REFERENCES)
def test_zero_task_gradients_change_nothing(pair: tuple[torch.Tensor, torch.Tensor], reference: str) -> None:
    with_zeros, grads = pair
    strategy = OrthoLoRA(reference=reference, shuffle=False)  # type: ignore[arg-type]
    direction = strategy(with_zeros)
    assert torch.isfinite(direction).all()
    assert_close_scaled(direction, strategy(grads), like=grads)


@given(tasks=st.integers(1, 5), width=st.integers(1, 12), seed=SEEDS, reference=REFERENCES)
def test_all_zero_gradients_give_a_zero_update(tasks: int, width: int, seed: int, reference: str) -> None:
    """PEFT's init has B = 0, so every task's gradient of A is exactly zero at the first step."""
    grads = torch.zeros(tasks, width)
    direction = OrthoLoRA(reference=reference)(grads, generator=seeded(seed))  # type: ignore[arg-type]
    assert torch.equal(direction, torch.zeros(width))
