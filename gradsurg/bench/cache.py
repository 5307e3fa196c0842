"""The run cache: finished runs are stored by a hash of everything that determines their result.

A run's key is the SHA-256 of a canonical JSON of: the cache format version, the gradsurg version,
the suite's complete configuration (data sizes, backbone, LoRA and training settings, steps), the
method (its key and the ``repr`` of its strategy with all default options), the tasks, the seed and
the device type. Each finished run is written at once to ``<out>/runs/<key>.json``, so an interrupted
or repeated comparison only computes what is missing. A file that cannot be read is treated as
missing (and rewritten).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import gradsurg
from gradsurg.bench.train import RunResult, RunSpec
from gradsurg.strategies.registry import get_strategy

__all__ = ["CACHE_FORMAT", "RunCache", "run_key_material"]

#: Bump when a code change alters what a run computes, to invalidate every cached run.
CACHE_FORMAT = 1


def run_key_material(suite_config: Mapping[str, Any], spec: RunSpec, device_type: str) -> dict[str, Any]:
    """Everything the result of ``spec`` depends on, as JSON-able data."""
    method = spec.method
    return {
        "cache_format": CACHE_FORMAT,
        "gradsurg": gradsurg.__version__,
        "suite": dict(suite_config),
        "method": method.key,
        "strategy": repr(get_strategy(method.name)) if method.is_strategy else None,
        "tasks": list(spec.tasks),
        "seed": spec.seed,
        "device": device_type,
    }


class RunCache:
    """Finished runs stored as JSON files under ``folder``."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder

    @staticmethod
    def key(material: Mapping[str, Any]) -> str:
        """The hex key of a run (first 20 hex digits of the SHA-256 of its canonical JSON)."""
        canonical = json.dumps(material, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    def path(self, key: str) -> pathlib.Path:
        """File of the run ``key``."""
        return self.folder / f"{key}.json"

    def load(self, key: str) -> RunResult | None:
        """The cached result of ``key``, or ``None`` if absent or unreadable."""
        try:
            data = json.loads(self.path(key).read_text())
            return RunResult.from_json(data["result"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, key: str, material: Mapping[str, Any], result: RunResult) -> None:
        """Write ``result`` (with its key material, for inspection) atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"key": key, "material": material, "result": result.to_json()}, indent=1)
        handle, temp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(handle, "w") as stream:
                stream.write(payload)
            os.replace(temp, self.path(key))
        except BaseException:
            pathlib.Path(temp).unlink(missing_ok=True)
            raise
