"""Adapters that build parameter groups from model libraries.

* :mod:`gradsurg.adapters.peft` — LoRA factor groups for Hugging Face PEFT models (needs the
  ``peft`` extra; imported lazily, ``import gradsurg`` never needs it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["peft"]


def __getattr__(name: str) -> ModuleType:
    if name == "peft":
        return importlib.import_module("gradsurg.adapters.peft")
    raise AttributeError(f"module 'gradsurg.adapters' has no attribute {name!r}")
