"""Tests of the run cache: keys follow the configuration, files round-trip, damage reads as missing."""

from __future__ import annotations

import pathlib

from gradsurg.bench.cache import RunCache, run_key_material
from gradsurg.bench.methods import Method
from gradsurg.bench.train import RunSpec
from tests.bench.helpers import fake_run

CONFIG = {"suite": "t", "train": {"steps": 10, "lr": 0.1}}
SPEC = RunSpec(Method("pcgrad"), ("a", "b"), 0)


def _key(config: dict = CONFIG, spec: RunSpec = SPEC, device: str = "cpu") -> str:  # type: ignore[type-arg]
    return RunCache.key(run_key_material(config, spec, device))


def test_key_is_stable_and_changes_with_everything_that_matters() -> None:
    assert _key() == _key({"train": {"lr": 0.1, "steps": 10}, "suite": "t"})  # key order does not matter
    others = {
        _key({"suite": "t", "train": {"steps": 11, "lr": 0.1}}),
        _key(spec=RunSpec(Method("pcgrad"), ("a", "b"), 1)),
        _key(spec=RunSpec(Method("cagrad"), ("a", "b"), 0)),
        _key(spec=RunSpec(Method("pcgrad", "layer"), ("a", "b"), 0)),
        _key(spec=RunSpec(Method("single"), ("a",), 0)),
        _key(device="cuda"),
    }
    assert _key() not in others and len(others) == 6


def test_material_records_the_strategy_with_its_options() -> None:
    material = run_key_material(CONFIG, RunSpec(Method("cagrad"), ("a", "b"), 0), "cpu")
    assert material["strategy"].startswith("CAGrad(") and "c=" in material["strategy"]
    assert run_key_material(CONFIG, RunSpec(Method("joint"), ("a", "b"), 0), "cpu")["strategy"] is None


def test_save_load_round_trip_and_damaged_files(tmp_path: pathlib.Path) -> None:
    cache = RunCache(tmp_path / "runs")
    key = _key()
    assert cache.load(key) is None
    run = fake_run("pcgrad", {"a": 0.5, "b": 0.25}, conflicts=(0.0, 1.0))
    cache.save(key, run_key_material(CONFIG, SPEC, "cpu"), run)
    assert cache.load(key) == run
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [f"{key}.json"]
    cache.path(key).write_text("{not json")
    assert cache.load(key) is None
