"""Reusable hypothesis strategies that *construct* gradient matrices, and property helpers.

Every strategy here builds the structure it promises (a conflict, an aligned set, a low rank, zero
rows, ...) instead of filtering random matrices, so hypothesis never wastes examples and shrinks to
small, readable cases. Entries live on a grid of step ``1/32767`` in ``[-1, 1]`` and are multiplied by
a power of ten in ``[1e-2, 1e2]`` per matrix and in ``[0.1, 10]`` per row: varied magnitudes (rows of very
different norms included) without denormals or overflow in float32.

The helpers compare results with tolerances scaled by the size of the input (:func:`magnitude`),
because the outputs of interest (sums, projections) can cancel to far below the size of the rows.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st
from torch import Tensor

__all__ = [
    "DTYPES",
    "aligned_sets",
    "any_gradient_matrix",
    "assert_close_scaled",
    "assert_in_row_span",
    "assert_positive_multiple",
    "clone_generator",
    "conflicting_pairs",
    "dtypes",
    "generic_matrices",
    "lora_factor_gradients",
    "magnitude",
    "matrices_with_zero_rows",
    "one_task",
    "rank_deficient",
    "rtol",
    "seeded",
    "separated_from_zero",
    "zero_in_hull",
]

DTYPES = (torch.float32, torch.float64)
dtypes = st.sampled_from(DTYPES)

_GRID = 2**15 - 1
# Relative tolerance per dtype, applied to magnitude(G): a few hundred ulps of float32 (Gram-space
# arithmetic, cancellation in sums); in float64, room for the small solvers inside strategies (CAGrad's
# dual, the MGDA family's QPs: accurate to ~1e-9, not to eps) while still far below any modelling difference.
_RTOL = {torch.float32: 2e-5, torch.float64: 1e-7}

Draw = st.DrawFn


def rtol(dtype: torch.dtype) -> float:
    """Relative tolerance (to :func:`magnitude` of the input) for results computed in ``dtype``."""
    return _RTOL[dtype]


def _entries(draw: Draw, *shape: int, nonnegative: bool = False) -> Tensor:
    """A float64 tensor of ``shape`` with entries on the grid ``k/32767``, ``|k| ≤ 32767``, of ``[-1, 1]``.

    Drawn as one byte string (two bytes per entry): fast to generate, and it shrinks toward zeros.
    """
    count = math.prod(shape)
    raw = draw(st.binary(min_size=2 * count, max_size=2 * count))
    values = torch.frombuffer(bytearray(raw), dtype=torch.int16).to(torch.float64) if count else torch.zeros(0)
    values = values.clamp_min(-_GRID) / _GRID
    return (values.abs() if nonnegative else values).reshape(shape).to(torch.float64)


def _power_of_ten(draw: Draw, low: int = -2, high: int = 2) -> float:
    return 10.0 ** draw(st.integers(low, high))


def _nonzero_vector(draw: Draw, width: int) -> Tensor:
    """Entries on the grid with one entry forced to magnitude ≥ 0.5 (so the norm is ≥ 0.5)."""
    vector = _entries(draw, width)
    k = draw(st.integers(0, width - 1))
    sign = draw(st.sampled_from((-1.0, 1.0)))
    vector[k] = sign * draw(st.integers(_GRID // 2, _GRID)) / _GRID
    return vector


_ROW_EXPONENTS = torch.tensor([0.0, 1.0, -1.0])


def _row_scales(draw: Draw, tasks: int) -> Tensor:
    """``10^(eᵢ + e)`` per row, ``eᵢ ∈ {−1, 0, 1}``, ``e ∈ [−2, 2]``: one byte string for all rows (fast)."""
    codes = torch.frombuffer(bytearray(draw(st.binary(min_size=tasks, max_size=tasks))), dtype=torch.uint8)
    per_row = _ROW_EXPONENTS[codes.long() % 3] if tasks else torch.zeros(0)
    return (10.0 ** per_row.to(torch.float64)).unsqueeze(1) * _power_of_ten(draw)


_TASKS = st.integers(1, 5)
_WIDTH = st.integers(1, 12)
_SEVERAL_TASKS = st.integers(2, 6)
_SEVERAL_WIDTH = st.integers(2, 12)
_FEW_TASKS = st.integers(2, 4)
_SMALL_WIDTH = st.integers(1, 8)
_ZERO_ROWS = st.integers(1, 2)


@st.composite
def generic_matrices(
    draw: Draw,
    tasks: st.SearchStrategy[int] = _TASKS,
    width: st.SearchStrategy[int] = _WIDTH,
    dtype: st.SearchStrategy[torch.dtype] = dtypes,
) -> Tensor:
    """Any ``Tensor[T, n]``: grid entries, each row and the whole matrix scaled by a power of ten."""
    t, n = draw(tasks), draw(width)
    return (_entries(draw, t, n) * _row_scales(draw, t)).to(draw(dtype))


@st.composite
def one_task(
    draw: Draw, width: st.SearchStrategy[int] = _WIDTH, dtype: st.SearchStrategy[torch.dtype] = dtypes
) -> Tensor:
    """``Tensor[1, n]`` (zero rows included: the grid holds 0)."""
    return draw(generic_matrices(tasks=st.just(1), width=width, dtype=dtype))


@st.composite
def conflicting_pairs(
    draw: Draw, width: st.SearchStrategy[int] = _WIDTH, dtype: st.SearchStrategy[torch.dtype] = dtypes
) -> Tensor:
    """``Tensor[2, n]`` with ``g₁·g₂ < 0`` by construction.

    ``g₂ = w − (w·g₁/‖g₁‖² + m) g₁`` with ``m ∈ [0.1, 2]`` gives ``g₁·g₂ = −m‖g₁‖²``; with
    ``‖g₁‖ ≥ 0.5`` and ``‖w‖ ≤ √12`` the cosine is at least ``0.01`` in magnitude, so the sign
    survives float32 rounding. ``n = 1`` gives exactly opposite gradients.
    """
    n = draw(width)
    g1 = _nonzero_vector(draw, n)
    w = _entries(draw, n)
    m = draw(st.integers(10, 200)) / 100
    g2 = w - (w @ g1 / (g1 @ g1) + m) * g1
    return (torch.stack([g1, g2]) * _row_scales(draw, 2)).to(draw(dtype))


@st.composite
def aligned_sets(
    draw: Draw,
    tasks: st.SearchStrategy[int] = _TASKS,
    width: st.SearchStrategy[int] = _WIDTH,
    dtype: st.SearchStrategy[torch.dtype] = dtypes,
) -> Tensor:
    """``Tensor[T, n]`` with every pairwise inner product ``≥ 0`` by construction.

    Either entries of one sign pattern shared by all rows (``gᵢ = s ⊙ |xᵢ|``: every product of
    entries is ``≥ 0``, exactly, in any precision), or a shared dominant direction ``u``:
    ``gᵢ = aᵢ u + rᵢ`` with ``rᵢ ⊥ u`` and ``‖rᵢ‖ ≤ 0.9 aᵢ``, so ``gᵢ·gⱼ ≥ 0.19 aᵢ aⱼ > 0``.
    """
    t, n = draw(tasks), draw(width)
    if draw(st.booleans()):
        signs = torch.tensor(draw(st.lists(st.sampled_from((-1.0, 1.0)), min_size=n, max_size=n)), dtype=torch.float64)
        rows = _entries(draw, t, n, nonnegative=True) * signs
    else:
        u = _nonzero_vector(draw, n)
        u = u / u.norm()
        r = _entries(draw, t, n)
        r = r - (r @ u).unsqueeze(1) * u
        lengths = r.norm(dim=1, keepdim=True)
        a = torch.tensor([draw(st.integers(10, 100)) / 100 for _ in range(t)], dtype=torch.float64).unsqueeze(1)
        shrink = torch.tensor([draw(st.integers(0, 90)) / 100 for _ in range(t)], dtype=torch.float64).unsqueeze(1)
        r = torch.where(lengths > 0, r / lengths.clamp_min(1e-300), r) * shrink * a
        rows = a * u + r
    return (rows * _row_scales(draw, t)).to(draw(dtype))


@st.composite
def rank_deficient(
    draw: Draw,
    tasks: st.SearchStrategy[int] = _SEVERAL_TASKS,
    width: st.SearchStrategy[int] = _SEVERAL_WIDTH,
    dtype: st.SearchStrategy[torch.dtype] = dtypes,
) -> Tensor:
    """Nonzero ``Tensor[T, n]`` of rank ``1 ≤ rank ≤ r < min(T, n)``: the product of ``[T, r]`` and ``[r, n]``
    factors (the rank-1 ``u vᵀ`` of two nonzero vectors if that product cancels to 0)."""
    t, n = draw(tasks), draw(width)
    r = draw(st.integers(1, min(t, n) - 1))
    rows = _entries(draw, t, r) @ _entries(draw, r, n)
    if not bool(rows.any()):
        rows = torch.outer(_nonzero_vector(draw, t), _nonzero_vector(draw, n))
    return (rows * _power_of_ten(draw)).to(draw(dtype))


@st.composite
def separated_from_zero(
    draw: Draw,
    tasks: st.SearchStrategy[int] = _SEVERAL_TASKS,
    width: st.SearchStrategy[int] = _SEVERAL_WIDTH,
    dtype: st.SearchStrategy[torch.dtype] = dtypes,
) -> Tensor:
    """``Tensor[T, n]`` whose convex hull stays at distance ``≥ 0.1`` from 0, with rows of norm ≈ 1.

    ``gᵢ = sᵢ u + rᵢ`` with ``u`` a unit vector, ``sᵢ ∈ [0.1, 1]`` and ``rᵢ ⊥ u`` of norm in
    ``[0.3, 1.5]``: every ``g_w`` of the hull has ``g_w·u ≥ 0.1``. Every hull that misses 0 has such a
    ``u`` (separating hyperplane), so this covers the generic case, conflicts included (``rᵢ·rⱼ``
    can be very negative).
    """
    t, n = draw(tasks), draw(width)
    u = _nonzero_vector(draw, n)
    u = u / u.norm()
    r = _entries(draw, t, n)
    r = r - (r @ u).unsqueeze(1) * u
    fallback = torch.linalg.svd(u.unsqueeze(0)).Vh[-1] if n > 1 else torch.zeros(n, dtype=torch.float64)
    r = torch.where(r.norm(dim=1, keepdim=True) > 1e-3, r, fallback)  # a zero draw still gets a direction
    lengths = torch.tensor([draw(st.integers(30, 150)) / 100 for _ in range(t)], dtype=torch.float64)
    r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-300) * lengths.unsqueeze(1)
    s = torch.tensor([draw(st.integers(10, 100)) / 100 for _ in range(t)], dtype=torch.float64)
    return (s.unsqueeze(1) * u + r).to(draw(dtype))


@st.composite
def zero_in_hull(
    draw: Draw,
    tasks: st.SearchStrategy[int] = _FEW_TASKS,
    width: st.SearchStrategy[int] = _SMALL_WIDTH,
    dtype: st.SearchStrategy[torch.dtype] = dtypes,
) -> Tensor:
    """``Tensor[T, n]`` with 0 in the convex hull of the rows: ``g_T = −Σᵢ₍<T₎ aᵢ gᵢ / a_T``, ``aᵢ > 0``."""
    t, n = draw(tasks), draw(width)
    first = torch.stack([_nonzero_vector(draw, n) for _ in range(t - 1)])
    a = torch.tensor([draw(st.integers(10, 100)) / 100 for _ in range(t)], dtype=torch.float64)
    last = -(a[:-1] @ first) / a[-1]
    return (torch.cat([first, last.unsqueeze(0)]) * _power_of_ten(draw)).to(draw(dtype))


def _insert_zero_rows(draw: Draw, matrix: Tensor, count: int) -> Tensor:
    rows = list(matrix)
    for _ in range(count):
        rows.insert(draw(st.integers(0, len(rows))), torch.zeros_like(matrix[0]))
    return torch.stack(rows)


@st.composite
def matrices_with_zero_rows(
    draw: Draw, base: st.SearchStrategy[Tensor] | None = None, count: st.SearchStrategy[int] = _ZERO_ROWS
) -> tuple[Tensor, Tensor]:
    """``(G with zero rows inserted at random positions, G)``; ``G`` from ``base`` (generic by default)."""
    matrix = draw(base if base is not None else generic_matrices())
    return _insert_zero_rows(draw, matrix, draw(count)), matrix


@st.composite
def lora_factor_gradients(
    draw: Draw, tasks: st.SearchStrategy[int] = _FEW_TASKS, dtype: st.SearchStrategy[torch.dtype] = dtypes
) -> tuple[Tensor, Tensor]:
    """Per-task gradients of the two factors of one LoRA layer, ``(G_A [T, r·k], G_B [T, d·r])``.

    With ``ΔW = B A`` and task ``t``'s gradient ``Mₜ = ∂Lₜ/∂ΔW`` (``d×k``): ``∂Lₜ/∂A = Bᵀ Mₜ`` and
    ``∂Lₜ/∂B = Mₜ Aᵀ``. ``B = 0`` (PEFT's init) is drawn half the time: then ``G_A`` is all zeros.
    """
    t = draw(tasks)
    d, k, r = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    a = _entries(draw, r, k)
    b = torch.zeros(d, r, dtype=torch.float64) if draw(st.booleans()) else _entries(draw, d, r)
    m = _entries(draw, t, d, k) * _power_of_ten(draw)
    grad_a = (b.T @ m).reshape(t, r * k)
    grad_b = (m @ a.T).reshape(t, d * r)
    target = draw(dtype)
    return grad_a.to(target), grad_b.to(target)


@st.composite
def any_gradient_matrix(draw: Draw, dtype: st.SearchStrategy[torch.dtype] = dtypes) -> Tensor:
    """One of every kind above: generic, conflicting pair, aligned, rank deficient, zero rows, LoRA, one task."""
    kinds: list[st.SearchStrategy[Tensor]] = [
        generic_matrices(dtype=dtype),
        conflicting_pairs(dtype=dtype),
        aligned_sets(dtype=dtype),
        rank_deficient(dtype=dtype),
        matrices_with_zero_rows(generic_matrices(dtype=dtype)).map(lambda pair: pair[0]),
        lora_factor_gradients(dtype=dtype).map(lambda pair: pair[0]),
        lora_factor_gradients(dtype=dtype).map(lambda pair: pair[1]),
        one_task(dtype=dtype),
    ]
    return draw(st.one_of(kinds))


# ---------------------------------------------------------------------------------- property helpers
def magnitude(grads: Tensor) -> float:
    """``Σᵢ ‖gᵢ‖``: the natural scale of a combination of the rows (an upper bound of ``‖Σᵢ gᵢ‖``)."""
    return float(grads.double().norm(dim=1).sum())


def assert_close_scaled(actual: Tensor, expected: Tensor, *, like: Tensor, factor: float = 1.0) -> None:
    """``‖actual − expected‖∞ ≤ factor · rtol(dtype) · magnitude(like)`` (plus a tiny absolute floor)."""
    tolerance = factor * rtol(like.dtype) * magnitude(like) + 1e-30
    error = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    assert error <= tolerance, f"max |difference| {error:.3e} exceeds {tolerance:.3e}\n{actual}\n{expected}"


def assert_in_row_span(direction: Tensor, grads: Tensor, *, factor: float = 1.0) -> None:
    """``direction = Gᵀ c`` for some ``c`` (least-squares residual within tolerance, in float64)."""
    basis = grads.double().T
    target = direction.double().unsqueeze(1)
    coefficients = torch.linalg.lstsq(basis, target, driver="gelsd").solution
    residual = (basis @ coefficients - target).squeeze(1)
    assert_close_scaled(residual, torch.zeros_like(residual), like=grads, factor=factor)


def assert_positive_multiple(direction: Tensor, g: Tensor, *, factor: float = 1.0) -> None:
    """``direction = β g`` with ``β > 0``, or ``direction = 0`` when ``g = 0``."""
    d, g64 = direction.double(), g.double()
    norm_sq = float(g64 @ g64)
    if norm_sq == 0.0:
        assert_close_scaled(d, torch.zeros_like(d), like=g.unsqueeze(0), factor=factor)
        return
    beta = float(d @ g64) / norm_sq
    assert beta > 0, f"expected a positive multiple of g, found β = {beta}"
    assert_close_scaled(d, beta * g64, like=(max(beta, 1.0) * g).unsqueeze(0), factor=factor)


def seeded(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def clone_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator in the same state (so two computations see the same random draws)."""
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone
