"""Validation metrics of the benchmark tasks (pure torch, no scikit-learn).

* ``accuracy`` — share of correct predictions;
* ``f1`` — binary F1 of class 1 (GLUE's metric for QQP, where class 1 is "duplicate");
* ``macro_f1`` — the unweighted mean over classes of each class's F1 (the embedded suite's metric;
  every class counts the same, so the majority class cannot dominate).

With ``P_k`` predictions of class ``k``, ``L_k`` labels of class ``k`` and ``C_k`` correct ones,
``F1_k = 2 C_k / (P_k + L_k)``; macro-F1 averages ``F1_k`` over the classes that occur in the labels
or the predictions (scikit-learn's default ``labels``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurg.bench.suites.base import METRICS
from gradsurg.errors import InvalidOptionError

__all__ = ["score"]


def score(metric: str, predictions: Tensor, labels: Tensor, num_classes: int) -> float:
    """The value of ``metric`` (in ``[0, 1]``) for integer ``predictions`` against ``labels``.

    Args:
        metric: One of ``"accuracy"``, ``"f1"``, ``"macro_f1"``.
        predictions: ``Tensor[N]`` of predicted class indices.
        labels: ``Tensor[N]`` of true class indices.
        num_classes: Number of classes (for the per-class counts).

    Raises:
        InvalidOptionError: Unknown metric, or predictions and labels of different lengths or empty.
    """
    if metric not in METRICS:
        raise InvalidOptionError(f"Metric must be one of {METRICS}; found {metric!r}.")
    if predictions.shape != labels.shape or labels.numel() == 0:
        raise InvalidOptionError(
            "Predictions and labels must be non-empty and of equal shape; found "
            f"{tuple(predictions.shape)} and {tuple(labels.shape)}."
        )
    predictions = predictions.long().cpu()
    labels = labels.long().cpu()
    if metric == "accuracy":
        return float((predictions == labels).double().mean())
    predicted = torch.bincount(predictions, minlength=num_classes).double()
    actual = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    denominator = predicted + actual
    f1 = torch.where(denominator > 0, 2 * correct / denominator.clamp_min(1), torch.zeros_like(denominator))
    if metric == "f1":
        return float(f1[1])
    return float(f1[denominator > 0].mean())
