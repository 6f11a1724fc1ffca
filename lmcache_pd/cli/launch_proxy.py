"""``lmcache-pd launch --role proxy``: run the proxy in this process with uvicorn.

Nothing on this path imports torch or vLLM (nor the transports, which import torch): the proxy
starts on a small machine that has neither (an import-linter contract in pyproject.toml, and
tests/packaging/test_install.py installs it so and serves through it).
"""

from __future__ import annotations

from collections.abc import Callable

import uvicorn

from lmcache_pd.config import PDConfig, check_exposure, configure_logging, keyring
from lmcache_pd.proxy.app import create_app


def launch(cfg: PDConfig, reload: Callable[[], PDConfig] | None = None) -> int:
    """``reload``: the config read again (its file and overrides) on SIGHUP: the instances the proxy
    routes to change without a restart (proxy/membership.py)."""
    keys = keyring(cfg)  # the secret is readable and long enough, and without one nothing binds beyond loopback
    check_exposure(cfg, keys, None)
    configure_logging(cfg.log_level)
    uvicorn.run(create_app(cfg, reload), host=cfg.proxy.host, port=cfg.proxy.port, log_level=cfg.log_level.lower())
    return 0
