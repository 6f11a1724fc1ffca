"""Shared-secret authentication: derived keys, message tags, handshake cookies (L0; stdlib only).

A deployment shares one secret (``auth.secret_file`` or ``LMCACHE_PD_SECRET``; config.py reads
it, never the command line). Everything that authenticates derives its own key from it, so a
key used in one place is useless in another:
  - control plane: pre-session frames (Hello, Challenge, Handshake, errors to them) are tagged
    with the deployment's control keys, one per direction; each session then has keys of its own,
    derived from both sides' fresh nonces, and every frame carries a sequence number that must
    grow (replay protection without comparing clocks across hosts);
  - tcp data plane: a challenge-response hello on every connection;
  - HTTP control APIs: a bearer token.
With no secret, the same code runs with keys derived from a public constant: garbled frames are
still caught, but anyone could sign, so instances then bind loopback only (config.py checks).
Tags are HMAC-SHA256 over length-prefixed parts: no two different part lists tag alike.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import struct
import time
from collections.abc import Callable

TAG_BYTES = 32
NONCE_BYTES = 16
MIN_SECRET_BYTES = 16
_PUBLIC = b"lmcache-pd: no secret configured (loopback only)"


def tag(key: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        mac.update(struct.pack("!I", len(p)))
        mac.update(p)
    return mac.digest()


def check(key: bytes, expected: bytes, *parts: bytes) -> bool:
    return len(expected) == TAG_BYTES and hmac.compare_digest(tag(key, *parts), expected)


def nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes nothing beyond this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DirectionKeys:
    """A pair of keys: frames prefill -> decode are tagged with one, replies with the other, so a
    frame cannot be reflected back to its sender."""

    __slots__ = ("to_decode", "to_prefill")

    def __init__(self, to_decode: bytes, to_prefill: bytes):
        self.to_decode = to_decode
        self.to_prefill = to_prefill


class Keyring:
    """Every key of one process, derived from the deployment secret (or the public constant)."""

    def __init__(self, secret: bytes | None):
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the shared secret must have at least {MIN_SECRET_BYTES} bytes")
        self.authenticated = secret is not None
        self._master = tag(secret if secret is not None else _PUBLIC, b"lmcache-pd master key v1")
        self.control = self._pair(b"control")

    def derive(self, purpose: bytes, *parts: bytes) -> bytes:
        return tag(self._master, purpose, *parts)

    def _pair(self, purpose: bytes, *parts: bytes) -> DirectionKeys:
        return DirectionKeys(self.derive(purpose + b"/to-decode", *parts), self.derive(purpose + b"/to-prefill", *parts))

    def session(self, identity: bytes, prefill_nonce: bytes, cookie: bytes) -> DirectionKeys:
        """Keys of one control session: bound to the peer's identity and to both sides' fresh
        values, so a recorded session's frames verify in no other session."""
        return self._pair(b"session", identity, prefill_nonce, cookie)

    @property
    def tcp(self) -> bytes:
        return self.derive(b"tcp-hello")

    @property
    def records_key(self) -> bytes:
        """Seals cache records that leave the process (disk and Redis tiers, cache/tier.py)."""
        return self.derive(b"cache-records")

    @property
    def api_token(self) -> str:
        """Bearer token of the HTTP control APIs (cache API on workers, /cache/* on the proxy)."""
        return self.derive(b"http-api").hex()

    def authorizes(self, header: str | None) -> bool:
        """Whether an HTTP ``Authorization`` header carries the API token (any header does when
        there is no secret: the API then binds loopback only)."""
        if not self.authenticated:
            return True
        scheme, _, token = (header or "").partition(" ")
        # Bytes: compare_digest raises on a str that is not ASCII (any client can send one).
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                                  self.api_token.encode())

    def refuse_exposure(self, host: str, what: str) -> None:
        """Raise PermissionError if ``what`` would listen on ``host`` beyond loopback without a
        secret (anyone reaching it could sign); config.check_exposure says the same, by field."""
        if not self.authenticated and not is_loopback(host):
            raise PermissionError(f"{what} refuses to listen on {host} without a shared secret "
                                  "(set auth.secret_file or LMCACHE_PD_SECRET, or bind loopback only)")

    def curve_server_secret(self) -> bytes:
        """32 raw bytes: the decode side's CurveZMQ secret key, which every holder of the secret
        can derive (and from it the public key that clients pin)."""
        return self.derive(b"curve-server")


class Cookies:
    """Stateless handshake cookies (the decode side's answer to Hello).

    A cookie binds the peer's identity and nonce to this process and to a window of its own
    monotonic clock: a Handshake must present one issued within the last two windows, once.
    Issuing keeps no state, so a replayed Hello changes nothing; only a Handshake whose tag and
    cookie verify is remembered (until its cookie could no longer verify anyway).
    """

    def __init__(self, window_s: float, *, clock: Callable[[], float] = time.monotonic, max_used: int = 65536):
        self.window_s = window_s
        self.clock = clock
        self.max_used = max_used
        self._key = secrets.token_bytes(32)  # new per process: a restarted decode refuses old cookies
        self._used: dict[bytes, float] = {}

    def _make(self, identity: bytes, peer_nonce: bytes, epoch: int) -> bytes:
        return tag(self._key, identity, peer_nonce, struct.pack("!q", epoch))[:NONCE_BYTES]

    def issue(self, identity: bytes, peer_nonce: bytes) -> bytes:
        return self._make(identity, peer_nonce, int(self.clock() // self.window_s))

    def redeem(self, identity: bytes, peer_nonce: bytes, cookie: bytes) -> bool:
        """True once for a cookie this process issued to this identity and nonce recently."""
        now = self.clock()
        epoch = int(now // self.window_s)
        if not any(hmac.compare_digest(cookie, self._make(identity, peer_nonce, e)) for e in (epoch, epoch - 1)):
            return False
        for c, until in list(self._used.items()):
            if until <= now:
                del self._used[c]
        if cookie in self._used or len(self._used) >= self.max_used:
            return False
        self._used[cookie] = now + 2 * self.window_s
        return True
