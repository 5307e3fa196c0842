"""The documentation covers the registry: one page per strategy, every page in the navigation.

The strict ``mkdocs build`` (``make docs``) checks that the pages render and that links resolve;
these tests check what it cannot: that a newly registered strategy gets a page and that a page is
not left out of the navigation.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import gradsurg as gs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# Pages deliberately kept out of the navigation for now.
# The output folder of a real `gradsurg compare` run, copied unchanged and linked from benchmarks.md.
NOT_IN_NAV = frozenset({"benchmarks/report.md"})


def navigation() -> set[str]:
    """Every Markdown path listed in the ``nav`` section of mkdocs.yml (the last top-level section)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = re.split(r"^nav:\s*$", text, flags=re.MULTILINE)[1]
    return set(re.findall(r"[\w./-]+\.md\b", nav))


def strategy_pages() -> set[str]:
    return {path.stem for path in (DOCS / "strategies").glob("*.md")} - {"index"}


def test_every_registered_strategy_has_a_page() -> None:
    missing = sorted(set(gs.list_strategies()) - strategy_pages())
    assert not missing, f"strategies without a page docs/strategies/<name>.md: {missing}"


def test_every_strategy_page_belongs_to_a_registered_strategy() -> None:
    stray = strategy_pages() - set(gs.list_strategies())
    assert not stray, f"pages under docs/strategies/ for no registered strategy: {sorted(stray)}"


def test_every_documentation_page_is_in_the_navigation() -> None:
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    absent = sorted(pages - navigation() - NOT_IN_NAV)
    assert not absent, f"pages missing from the mkdocs.yml nav: {absent}"


@pytest.mark.usefixtures("one_thread")
def test_the_quickstart_loop_runs_and_trains_the_trunk_with_pcgrad() -> None:
    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if "surgeon.backward" in b)
    namespace: dict[str, object] = {}
    exec(compile(block, "docs/quickstart.md", "exec"), namespace)
    surgeon = namespace["surgeon"]
    assert isinstance(surgeon, gs.Surgeon)
    assert surgeon.steps == 100
    assert repr(surgeon.strategies["all"]).startswith("PCGrad(")
    trunk, heads = namespace["trunk"], namespace["heads"]
    assert isinstance(trunk, torch.nn.Module) and isinstance(heads, torch.nn.Module)
    assert all(p.grad is not None for p in [*trunk.parameters(), *heads.parameters()])
