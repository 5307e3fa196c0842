"""Griffe extension for the docs build: render the reStructuredText bits of docstrings in Markdown.

The package's docstrings use reStructuredText roles (``:class:`~gradsurg.Surgeon```) and ``text::``
before literal blocks, which Markdown would show verbatim. This extension rewrites each role into an
*optional* autorefs link (it points to the object's API entry when one is rendered and falls back to
plain code otherwise, so a role never breaks the strict build) and ``text::`` into ``text:`` (the
indented block that follows is a Markdown code block already).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|mod|attr|exc|data|obj):`(?P<short>~?)(?P<target>[^`]+)`")
_CALLABLE_ROLES = frozenset({"func", "meth"})
_LITERAL_BLOCK = re.compile(r"(?<=\S)::$", re.MULTILINE)  # "loop::" introduces an indented code block


def _identifier(obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` seen from ``obj`` (its first component resolved in ``obj``'s scope)."""
    head, _, rest = target.partition(".")
    scope = obj if obj.is_class or obj.is_module else obj.parent or obj
    try:
        resolved = scope.resolve(head)
        path = f"{resolved}.{rest}" if rest else resolved
    except (griffe.NameResolutionError, KeyError, ValueError):
        path = target  # already a full path, such as ``gradsurg.Surgeon``
    try:  # a re-export such as ``gradsurg.Surgeon.backward``: link to where it is defined
        found = obj.modules_collection[path]
        return str(found.final_target.path if found.is_alias else found.path)
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return path


def _rewrite(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match[str]) -> str:
        target = match["target"]
        title = target.rsplit(".", 1)[-1] if match["short"] else target
        if match["role"] in _CALLABLE_ROLES:
            title += "()"
        return f'<autoref identifier="{_identifier(obj, target)}" optional><code>{title}</code></autoref>'

    return _LITERAL_BLOCK.sub(":", _ROLE.sub(link, text))


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj, obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
