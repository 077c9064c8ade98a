"""One registry pattern for everything users pick by name: estimators, compression methods, backends.

Each registry maps a name to an entry. Built-ins register when their module is imported (the
registry imports them on first lookup); third-party packages add theirs through an entry-point
group (``[project.entry-points."cwca_export.methods"] mine = "pkg.module"``), loaded on first
lookup too. An entry point names either a module that registers its entries on import (with the
registry's decorator), or, where the registry knows how to adopt an object (backends: a class),
that object. A plug-in that fails to load is reported as one line naming it and its group: a
warning on any lookup (the built-ins keep working), an error when it is the one asked for.

Example:
    >>> colours = Registry("colour", flag="--colour", group="example.colours")
    >>> colours.add("red", "#f00")
    >>> colours.get("red"), colours.names()
    ('#f00', ['red'])
    >>> colours.get("blue")
    Traceback (most recent call last):
    ...
    ValueError: unknown colour 'blue'; choose one of: red (--colour)
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from importlib import metadata
from typing import Any, Generic, TypeVar

T = TypeVar("T")
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class PluginError(RuntimeError):
    """A plug-in named by an entry point could not be loaded or registered nothing."""


class Registry(MutableMapping, Generic[T]):
    """Entries of one kind by name; built-in modules and entry-point plug-ins load on first lookup.

    Args:
        kind: what an entry is, for messages (``"scoring method"``).
        flag: the CLI flag that picks an entry, named in the unknown-name error.
        group: the entry-point group third-party packages register under.
        builtins: modules imported on first lookup; each registers its entries on import.
        adopt: ``adopt(name, obj)`` registers an object an entry point names (for registries
            whose entries are objects, not modules that register themselves).
        name_pattern: the names this registry accepts.
    """

    def __init__(
        self,
        kind: str,
        *,
        flag: str,
        group: str,
        builtins: Sequence[str] = (),
        adopt: Callable[[str, Any], None] | None = None,
        name_pattern: re.Pattern[str] = NAME,
    ) -> None:
        self.kind, self.flag, self.group = kind, flag, group
        self.builtins = tuple(builtins)
        self.adopt = adopt
        self.name_pattern = name_pattern
        self._entries: dict[str, T] = {}
        self._broken: dict[str, str] = {}
        self._loaded = False

    # -- registration
    def check_name(self, name: str) -> None:
        """Refuse a malformed name or one already taken (one line naming the owner)."""
        if not isinstance(name, str) or not self.name_pattern.match(name):
            raise ValueError(f"{self.kind} name {name!r}: use lower-case letters, digits and _")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` under ``name``; malformed or duplicate names are refused."""
        self.check_name(name)
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests, plug-in reloads); unknown names are ignored."""
        self._entries.pop(name, None)

    # -- lookup
    def get(self, name: str, default: Any = ...) -> T:  # type: ignore[override]
        """The entry registered as ``name``; an unknown name lists the known ones and the flag."""
        self.load()
        if name in self._entries:
            return self._entries[name]
        if default is not ...:
            return default
        if name in self._broken:
            raise PluginError(self._broken[name])
        raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())} ({self.flag})")

    def names(self) -> list[str]:
        """Every registered name, built-in and plug-in, sorted."""
        self.load()
        return sorted(self._entries)

    # -- loading
    def load(self) -> None:
        """Import the built-in modules and the entry-point plug-ins, once."""
        if self._loaded:
            return
        self._loaded = True
        for module in self.builtins:
            importlib.import_module(module)
        self.refresh()

    def refresh(self) -> None:
        """Load entry points of this registry's group that are not registered yet."""
        for ep in metadata.entry_points(group=self.group):
            if ep.name in self._entries or ep.name in self._broken:
                continue
            try:
                obj = ep.load()
                if ep.name not in self._entries:
                    if self.adopt is None or isinstance(obj, type(importlib)):
                        raise PluginError(f"it registered no {self.kind} named {ep.name!r}")
                    self.adopt(ep.name, obj)
            except Exception as exc:  # a broken plug-in: one line, not a traceback from its code
                detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self._broken[ep.name] = (
                    f"plug-in {ep.name!r} ({ep.value}, entry-point group {self.group}) failed to load:"
                    f" {detail}; fix or uninstall the package that provides it"
                )
                warnings.warn(self._broken[ep.name], RuntimeWarning, stacklevel=2)

    # -- mapping protocol (reads load first)
    def __getitem__(self, name: str) -> T:
        self.load()
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self.load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self.load()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
