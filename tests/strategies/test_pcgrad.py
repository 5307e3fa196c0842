"""PCGrad (and Ortho-LoRA's shared-order variant) against a literal reference, a closed form and TorchJD.

The reference below is Algorithm 1 of Yu et al. (2020) written as plainly as possible: Python loops
over tasks and partners, one vector at a time, in float64. The library instead works in Gram space;
both must agree for the same visiting orders, which the tests reproduce from the same generator
state (``per_task_orders`` for PCGrad, one ``randperm`` for Ortho-LoRA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, find, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torchjd.aggregation import PCGrad as TorchJDPCGrad

from gradsurg.strategies import OrthoLoRA, PCGrad
from gradsurg.strategies.projection import per_task_orders, projection_coefficients, projection_weights
from tests.hyp import (
    aligned_sets,
    any_gradient_matrix,
    assert_close_scaled,
    clone_generator,
    conflicting_pairs,
    generic_matrices,
    magnitude,
    rtol,
    seeded,
)

REFERENCES = ["original", "sequential"]
SEED = st.integers(0, 2**32 - 1)
F64 = st.just(torch.float64)


@dataclass
class Literal:
    """What the literal loop computed: the projected rows and, per task, the partners it was
    projected against; ``conditioning`` is the smallest ``‖gⱼ‖²/‖gⱼ⁽⁰⁾‖²`` of a partner used (1 when no
    partner shrank): the sequential reading is discontinuous where a partner's current ``gⱼ → 0``."""

    rows: Tensor
    projected_against: list[list[int]]
    conditioning: float


def literal_pcgrad(
    grads: Tensor, partners: Sequence[Sequence[int]], outer: Sequence[int], reference: str
) -> Literal:
    """Algorithm 1 by the book, in exact rational arithmetic (so it is the truth, not another float sum).

    For ``i`` in ``outer``, for ``j`` in ``partners[i]``: if ``gᵢ·gⱼ < 0``, ``gᵢ ← gᵢ − (gᵢ·gⱼ/‖gⱼ‖²) gⱼ``,
    with ``gⱼ`` the original gradient (``"original"``) or its current value (``"sequential"``).
    """
    originals = [[Fraction(float(x)) for x in row] for row in grads.double()]
    current = [list(row) for row in originals]
    projected_against: list[list[int]] = [[] for _ in originals]
    conditioning = 1.0
    for i in outer:
        for j in partners[i]:
            against = originals[j] if reference == "original" else current[j]
            norm = _dot(against, against)
            if norm == 0:
                continue
            conditioning = min(conditioning, float(norm / _dot(originals[j], originals[j])))
            dot = _dot(current[i], against)
            if dot < 0:
                current[i] = [x - dot / norm * y for x, y in zip(current[i], against)]
                projected_against[i].append(j)
    rows = torch.tensor([[float(x) for x in row] for row in current], dtype=torch.float64)
    return Literal(rows.reshape(grads.shape), projected_against, conditioning)


def _dot(x: Sequence[Fraction], y: Sequence[Fraction]) -> Fraction:
    return sum((a * b for a, b in zip(x, y)), Fraction(0))


def index_orders(tasks: int) -> list[list[int]]:
    """Every task visits the others in index order."""
    return [[j for j in range(tasks) if j != i] for i in range(tasks)]


def library_projected(grads: Tensor, seed: int, reference: str = "original") -> Tensor:
    """The library's projected task gradients ``gᵢ'`` (rows of ``C G``) for the orders ``seed`` draws.

    Their sum is checked to match what ``PCGrad`` returns, so properties of the rows are
    properties of the strategy.
    """
    tasks = grads.shape[0]
    partners = per_task_orders(tasks, seeded(seed))
    g64 = grads.double()
    projected = projection_coefficients(g64 @ g64.T, partners, torch.arange(tasks), reference) @ g64
    strategy = PCGrad(reference=reference)  # type: ignore[arg-type]
    assert_close_scaled(strategy(grads, generator=seeded(seed)), projected.sum(dim=0), like=grads)
    return projected


def literal_sum(grads: Tensor, partners: Sequence[Sequence[int]], outer: Sequence[int], reference: str) -> Tensor:
    """The literal update; skips (``assume``) the ill-conditioned sequential cases (see :class:`Literal`)."""
    literal = literal_pcgrad(grads, partners, outer, reference)
    assume(literal.conditioning > 1e-6)
    return literal.rows.sum(dim=0)


# ---------------------------------------------------------------------------------- literal reference
@pytest.mark.parametrize("reference", REFERENCES)
@given(grads=any_gradient_matrix())
def test_matches_literal_loop_in_index_order(reference: str, grads: Tensor) -> None:
    tasks = grads.shape[0]
    expected = literal_sum(grads, index_orders(tasks), range(tasks), reference)
    assert_close_scaled(PCGrad(reference=reference, shuffle=False)(grads), expected, like=grads, factor=8)


@pytest.mark.parametrize("reference", REFERENCES)
@given(grads=any_gradient_matrix(), seed=SEED)
def test_matches_literal_loop_with_random_orders(reference: str, grads: Tensor, seed: int) -> None:
    generator = seeded(seed)
    tasks = grads.shape[0]
    partners = per_task_orders(tasks, clone_generator(generator)).tolist()
    expected = literal_sum(grads, partners, range(tasks), reference)
    assert_close_scaled(PCGrad(reference=reference)(grads, generator=generator), expected, like=grads, factor=8)


@pytest.mark.parametrize("reference", REFERENCES)
@given(grads=any_gradient_matrix(), seed=SEED)
def test_ortho_lora_matches_literal_loop_with_one_shared_order(reference: str, grads: Tensor, seed: int) -> None:
    """Ortho-LoRA: one order π per call; task i visits π without i, and tasks are processed in π."""
    generator = seeded(seed)
    order = torch.randperm(grads.shape[0], generator=clone_generator(generator)).tolist()
    partners = {i: [j for j in order if j != i] for i in order}
    expected = literal_sum(grads, partners, order, reference)
    assert_close_scaled(OrthoLoRA(reference=reference)(grads, generator=generator), expected, like=grads, factor=8)


def test_random_orders_are_a_permutation_of_the_others_per_task() -> None:
    orders = per_task_orders(5, seeded(3))
    assert [sorted(row) for row in orders.tolist()] == index_orders(5)
    assert orders.tolist() != index_orders(5)  # with 4! orders per task, seed 3 does shuffle
    assert per_task_orders(5, seeded(3), shuffle=False).tolist() == index_orders(5)


# ---------------------------------------------------------------------------------- closed forms and properties
@pytest.mark.parametrize("shuffle", [False, True])
@given(grads=conflicting_pairs(), seed=SEED)
def test_two_conflicting_tasks_match_the_closed_form(shuffle: bool, grads: Tensor, seed: int) -> None:
    """d = g₁ + g₂ − (g₁·g₂/‖g₂‖²) g₂ − (g₁·g₂/‖g₁‖²) g₁ when g₁·g₂ < 0."""
    g1, g2 = grads.double()
    dot = g1 @ g2
    assert dot < 0  # the construction guarantees the conflict
    expected = g1 + g2 - dot / (g2 @ g2) * g2 - dot / (g1 @ g1) * g1
    assert_close_scaled(PCGrad(shuffle=shuffle)(grads, generator=seeded(seed)), expected, like=grads, factor=8)


@pytest.mark.parametrize("reference", REFERENCES)
@given(grads=aligned_sets(), seed=SEED)
def test_no_conflict_equals_sum(reference: str, grads: Tensor, seed: int) -> None:
    result = PCGrad(reference=reference)(grads, generator=seeded(seed))
    assert_close_scaled(result, grads.double().sum(dim=0), like=grads)


@given(grads=st.one_of(conflicting_pairs(), generic_matrices(tasks=st.just(2))), seed=SEED)
def test_two_tasks_no_conflict_remains(grads: Tensor, seed: int) -> None:
    """T = 2: each projected gradient, and the update, has gᵢ'·gⱼ ≥ 0 with every original gⱼ."""
    projected = library_projected(grads, seed)
    update = PCGrad()(grads, generator=seeded(seed)).double()
    tolerance = rtol(grads.dtype) * magnitude(grads) ** 2
    for g in grads.double():
        assert update @ g >= -tolerance
        for g_projected in projected:
            assert g_projected @ g >= -tolerance


@given(grads=any_gradient_matrix(F64), seed=SEED)
def test_last_projection_leaves_no_conflict(grads: Tensor, seed: int) -> None:
    """Any T (``reference="original"``): gᵢ' does not conflict with the last gⱼ it visited, and is
    orthogonal to the last gⱼ it was actually projected against."""
    tasks = grads.shape[0]
    partners = per_task_orders(tasks, seeded(seed)).tolist()
    projected = library_projected(grads, seed)
    projected_against = literal_pcgrad(grads, partners, range(tasks), "original").projected_against
    tolerance = 1e-12 * magnitude(grads) ** 2
    for i in range(tasks):
        if partners[i]:
            assert projected[i] @ grads[partners[i][-1]] >= -tolerance
        if projected_against[i]:
            assert abs(projected[i] @ grads[projected_against[i][-1]]) <= tolerance


def _earlier_conflict_comes_back(grads: Tensor) -> bool:
    """Some task, projected off gⱼ and later off another gradient, conflicts with gⱼ again."""
    literal = literal_pcgrad(grads, index_orders(3), range(3), "original")
    return any(
        float(literal.rows[i] @ grads[j]) < -0.01 for i in range(3) for j in literal.projected_against[i]
    )


def test_three_tasks_a_later_projection_can_recreate_an_earlier_conflict() -> None:
    """For T ≥ 3, "gᵢ' does not conflict with any gⱼ it was projected against" is false.

    Hypothesis searches small integer gradients in the plane (visiting order: index order) and finds
    a task that, projected off gⱼ and then off gₖ, conflicts with gⱼ again; the library's projected
    gradients are the literal loop's there, so the limitation is the library's too.
    """
    small_integer_matrices = st.lists(st.integers(-3, 3), min_size=6, max_size=6).map(
        lambda values: torch.tensor(values, dtype=torch.float64).reshape(3, 2)
    )
    grads = find(
        small_integer_matrices,
        _earlier_conflict_comes_back,
        settings=settings(max_examples=5000, derandomize=True, database=None),
    )
    literal = literal_pcgrad(grads, index_orders(3), range(3), "original")
    partners = torch.tensor(index_orders(3))
    library = projection_coefficients(grads @ grads.T, partners, torch.arange(3), "original") @ grads
    assert_close_scaled(library, literal.rows, like=grads)
    assert_close_scaled(PCGrad(shuffle=False)(grads), library.sum(dim=0), like=grads)


# ---------------------------------------------------------------------------------- TorchJD
def _close_relative(actual: Tensor, expected: Tensor, like: Tensor) -> None:
    # "1e-5 relative": relative to the size of the input rows, as the update may cancel to ~0.
    error = float((actual.double() - expected.double()).abs().max())
    assert error <= 1e-5 * magnitude(like), f"{actual} vs TorchJD {expected}"


@given(grads=st.one_of(conflicting_pairs(dtype=F64), generic_matrices(st.just(2), dtype=F64)))
def test_matches_torchjd_for_two_tasks(grads: Tensor) -> None:
    """For two tasks the visiting order is irrelevant, so TorchJD's unseeded shuffle does not matter."""
    _close_relative(PCGrad()(grads, generator=seeded(0)), TorchJDPCGrad()(grads), grads)


@given(grads=generic_matrices(st.integers(3, 5), dtype=F64), seed=SEED)
def test_matches_torchjd_with_its_own_orders(grads: Tensor, seed: int) -> None:
    """T ≥ 3: replay the orders TorchJD draws (one ``torch.randperm(T)`` per task from the global RNG)."""
    tasks = grads.shape[0]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        permutations = [torch.randperm(tasks).tolist() for _ in range(tasks)]
        torch.manual_seed(seed)
        expected = TorchJDPCGrad()(grads)
    partners = torch.tensor([[j for j in permutation if j != i] for i, permutation in enumerate(permutations)])
    weights = projection_weights(grads @ grads.T, partners, torch.arange(tasks), "original")
    _close_relative(weights @ grads, expected, grads)
