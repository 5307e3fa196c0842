"""GradDrop: TorchJD cross-check with the same uniform draws, the sign-selection property, options."""

from __future__ import annotations

import pytest
import torch
from torchjd.aggregation import GradDrop as TorchJDGradDrop

from gradsurg.errors import InvalidOptionError
from gradsurg.strategies.graddrop import GradDrop
from tests.hyp import seeded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("leak", [0.0, 0.3, (0.0, 0.5, 1.0)])
def test_matches_torchjd_with_the_same_draws(dtype: torch.dtype, leak: float | tuple[float, ...]) -> None:
    grads = torch.randn(3, 50, generator=seeded(1), dtype=dtype)
    leaks = torch.tensor(leak if isinstance(leak, tuple) else (leak,) * 3, dtype=dtype)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(123)
        expected = TorchJDGradDrop(leak=leaks)(grads)
    finally:
        torch.set_rng_state(state)
    torch.testing.assert_close(GradDrop(leak=leak)(grads, generator=seeded(123)), expected)


def test_each_coordinate_keeps_one_sign_with_probability_the_purity() -> None:
    grads = torch.tensor([[3.0, 1.0, -2.0], [-1.0, 1.0, -1.0]], dtype=torch.float64)  # purity 0.75, 1, 0
    positive = 0
    for seed in range(400):
        out = GradDrop()(grads, generator=seeded(seed))
        assert out[0].item() in (3.0, -1.0)
        assert out[1].item() == 2.0 and out[2].item() == -3.0
        positive += out[0].item() == 3.0
    assert 0.65 < positive / 400 < 0.85


def test_full_leak_is_the_sum() -> None:
    grads = torch.randn(4, 9, generator=seeded(2))
    torch.testing.assert_close(GradDrop(leak=1.0)(grads, generator=seeded(0)), grads.sum(dim=0))


def test_leak_tuple_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(InvalidOptionError, match="one entry per task"):
        GradDrop(leak=(0.1, 0.2))(torch.randn(3, 4))


@pytest.mark.parametrize("leak", [-0.1, 1.5, (), (0.2, 2.0), float("nan"), "0.1"])
def test_invalid_options(leak: object) -> None:
    with pytest.raises(InvalidOptionError, match="of GradDrop must be"):
        GradDrop(leak=leak)  # type: ignore[arg-type]
