"""A Griffe extension for the API reference: the docstrings' Sphinx roles as cross-references.

The docstrings write references as Sphinx does (``:func:`fit```,
``:class:`iwae.latent.ModuleVAE```, ``:meth:`~Objective.backward```); mkdocstrings reads
Markdown. Each role becomes an optional
autoref: a link where the target is documented on the site, else its name in code.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")


def _identifier(obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as seen from ``obj``'s scope (as given where unresolved)."""
    target = target.lstrip(".")
    if target.startswith(f"{obj.package.name}."):  # a full path: follow aliases to the object
        try:
            found = obj.modules_collection[target]
            return found.target_path if found.is_alias else found.path
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return target
    head, _, rest = target.partition(".")
    for name, tail in ((target, ""), (head, rest)):
        try:
            path = obj.resolve(name)
        except (griffe.NameResolutionError, ValueError):
            continue
        return f"{path}.{tail}" if tail else path
    return target


def _replace(obj: griffe.Object, text: str) -> str:
    def autoref(match: re.Match) -> str:
        short, target = match.groups()
        shown = target.rsplit(".", 1)[-1] if short else target
        identifier = _identifier(obj, target)
        return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'

    return ROLE.sub(autoref, text)


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = _replace(obj, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)
