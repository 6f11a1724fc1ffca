"""vLLM KV connector of lmcache-pd: ``kv_connector_module_path=lmcache_pd.connector``,
``kv_connector=PDConnector`` (facade.py says the rest).

``PDConnector`` is looked up lazily (module ``__getattr__``), so that importing this package,
or ``compat`` in it, does not import vLLM: the launcher checks the installed vLLM's version
with compat before anything of vLLM is imported.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PDConnector"]


def __getattr__(name: str) -> Any:
    if name == "PDConnector":
        from lmcache_pd.connector.facade import PDConnector

        return PDConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
