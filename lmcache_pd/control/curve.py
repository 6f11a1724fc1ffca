"""CurveZMQ keys of the control plane (``auth.encrypt``), derived from the shared secret.

Every holder of the secret derives the decode side's key pair, so prefill workers pin the
decode's public key without any exchange; each client uses a fresh key pair of its own (it is
authenticated by the session tags, not by its Curve key). Curve encrypts the control plane; the
tcp data plane encrypts its own records (transport/_sealed.py); docs/security.md.
"""

from __future__ import annotations

import zmq
from zmq.utils import z85

from lmcache_pd.auth import Keyring


def server_keys(keys: Keyring) -> tuple[bytes, bytes]:
    """(public, secret) of the decode side, z85-encoded."""
    secret = z85.encode(keys.curve_server_secret())
    return zmq.curve_public(secret), secret


def require_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError("auth.encrypt needs a libzmq built with CurveZMQ (pyzmq's wheels have it)")
