"""How text becomes config data (L1, beside config.py): ``--set``/environment overrides applied to
the parsed tree, and msgspec's validation errors split into the field they name and the message."""

from __future__ import annotations

from typing import Any

import yaml

from lmcache_pd.errors import ConfigError


def apply_override(tree: dict[str, Any], item: str, origin: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form section.field=value", source=origin)
    parts = key.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError("no such list index", field=".".join(parts[: i + 1]), source=origin)
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError("not a section", field=".".join(parts[: i + 1]), source=origin)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"value is not a YAML scalar: {e}", field=key, source=origin) from None
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError("no such list index", field=key, source=origin)
        node[int(last)] = value
    else:
        node[last] = value


def split_msgspec_error(text: str) -> tuple[str | None, str]:
    # msgspec: "Expected `int`, got `str` - at `$.pool.size_mib`" or
    #          "Object contains unknown field `foo` - at `$.pool`"
    message, _, at = text.partition(" - at `")
    path = at.rstrip("`").removeprefix("$").lstrip(".") if at else ""
    path = path.replace("[", ".").replace("]", "")
    if message.startswith("Object contains unknown field `"):
        name = message.split("`")[1]
        return (f"{path}.{name}" if path else name), "unknown field"
    if message.startswith("Object missing required field `"):
        name = message.split("`")[1]
        return (f"{path}.{name}" if path else name), "required field is missing"
    return (path or None), message
