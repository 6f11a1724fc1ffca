"""lmcache-pd: disaggregated prefill/decode KV-cache transfer for vLLM.

Public surface (benchmarks and launchers use only this): the config, the errors, the layout and
plan helpers, and the transport registry (``lmcache_pd.transport``). Importing this package does
not import torch, zmq or vLLM.
"""

from lmcache_pd._types import BatchState, ReservationState
from lmcache_pd.auth import Keyring
from lmcache_pd.config import PDConfig, config_from_dict, load_config
from lmcache_pd.errors import (
    ConfigError,
    IncompatiblePeer,
    PDError,
    PeerLost,
    PoolExhausted,
    ProtocolError,
    TransferError,
    TransferTimeout,
    TransportUnavailable,
)
from lmcache_pd.layout import KVLayout, PoolLayout, RangePlan, coalesce, plan_cache_to_pool
from lmcache_pd.protocol import PROTOCOL_VERSION

__version__ = "0.1.0"
__all__ = [
    "PROTOCOL_VERSION", "BatchState", "ConfigError", "IncompatiblePeer", "KVLayout", "Keyring", "PDConfig", "PDError",
    "PeerLost", "PoolExhausted", "PoolLayout", "ProtocolError", "RangePlan", "ReservationState", "TransferError",
    "TransferTimeout", "TransportUnavailable", "__version__", "coalesce", "config_from_dict", "load_config",
    "plan_cache_to_pool",
]
