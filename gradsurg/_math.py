"""Tiny tensor helpers shared across modules."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["safe_divide"]


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` where ``denominator > 0``, else 0 — with no inf/nan in either branch."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, torch.ones_like(denominator)), 0.0)
