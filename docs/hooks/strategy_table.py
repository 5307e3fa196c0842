"""MkDocs hook: replace ``<!-- strategy-table -->`` with a table generated from the strategy registry.

The table lists every registered strategy (name, family, what it needs from the Surgeon, the
properties the conformance tests check, its cost) so the overview can never drift from the code.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- strategy-table -->"


def _table() -> str:
    import gradsurg as gs

    lines = [
        "| name | family | needs | declared properties | cost | summary |",
        "|---|---|---|---|---|---|",
    ]
    for name in gs.list_strategies():
        info = gs.strategy_info(name)
        needs = ", ".join(sorted(info.needs | info.requires)) or "gradients only"
        properties = ", ".join(sorted(info.properties)) or "—"
        lines.append(
            f"| [`{name}`]({name}.md) | {info.family} | {needs} | {properties} | {info.cost} | {info.summary} |"
        )
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Insert the generated table where the marker stands."""
    return markdown.replace(MARKER, _table()) if MARKER in markdown else markdown
