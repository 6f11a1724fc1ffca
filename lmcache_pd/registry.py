"""Plug-ins by name, imported only when selected (L1): transports and cache tiers use it.

A registry maps a name to ``"package.module:ClassName"``. Duplicate names are refused, the
module is imported only by :meth:`Registry.get_class`, and each plug-in's ``Options`` struct
validates its own options, with errors naming the config field.
"""

from __future__ import annotations

import importlib
from typing import Any

import msgspec

from lmcache_pd.errors import ConfigError


class Registry:
    def __init__(self, kind: str, builtin: dict[str, str], *, field: str, unavailable: type[Exception]):
        """``field``: the config field that names a plug-in (for errors); ``unavailable``: the
        error raised when a registered module cannot be imported here."""
        self.kind = kind
        self.field = field
        self.unavailable = unavailable
        self._targets = dict(builtin)

    def register(self, name: str, target: str) -> None:
        """Register ``"module.path:ClassName"`` under ``name``. Duplicate names are refused."""
        if name in self._targets:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._targets[name]})")
        if ":" not in target:
            raise ValueError(f"target {target!r} must look like 'package.module:ClassName'")
        self._targets[name] = target

    def names(self) -> list[str]:
        return sorted(self._targets)

    def get_class(self, name: str, *, field: str | None = None) -> Any:
        if name not in self._targets:
            raise ConfigError(f"unknown {self.kind} {name!r} (registered: {', '.join(self.names())})",
                              field=field or self.field)
        module, _, cls = self._targets[name].partition(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except ImportError as e:
            raise self.unavailable(f"{self.kind} {name!r} cannot be imported here: {e}") from e

    def parse_options(self, name: str, options: dict[str, Any], *, field: str) -> msgspec.Struct:
        """Validate ``options`` against the plug-in's own ``Options`` struct; ``field`` is where
        the options sit in the config (``transport.options``)."""
        cls = self.get_class(name)
        try:
            return msgspec.convert(options, cls.Options, strict=True)
        except msgspec.ValidationError as e:
            msg, _, at = str(e).partition(" - at `")
            path = at.rstrip("`").removeprefix("$").lstrip(".")
            if msg.startswith("Object contains unknown field `"):
                path, msg = msg.split("`")[1], "unknown field"
            raise ConfigError(msg, field=f"{field}{'.' + path if path else ''}") from None
