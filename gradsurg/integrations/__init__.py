"""Integrations with training frameworks (each imported lazily; ``import gradsurg`` needs none of them).

* :mod:`gradsurg.integrations.transformers` — :class:`MultiTaskTrainer`, a Hugging Face ``Trainer``
  that trains several tasks at once with a :class:`~gradsurg.Surgeon` (needs the ``transformers``
  extra).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["transformers"]


def __getattr__(name: str) -> ModuleType:
    if name == "transformers":
        return importlib.import_module("gradsurg.integrations.transformers")
    raise AttributeError(f"module 'gradsurg.integrations' has no attribute {name!r}")
