"""Encrypted tcp batches (``auth.encrypt``): AES-256-GCM records on one connection.

Keys: one per connection and direction, derived from the deployment's tcp key and both nonces
of that connection's hello (auth.py), so no two connections share a key. A record is
``ciphertext || 16-byte tag``; its nonce is a per-direction counter from 0 (never sent, never
reused under one key). A batch, sender -> receiver:
  1. the batch header, in clear but authenticated as the table's associated data;
  2. the range table, one record;
  3. one record per piece of the payload, the pieces the table implies (at most
     ``piece_bytes`` each, in table order).
The receiver decrypts each piece into a buffer of its own and copies it into the pool only
once its tag verified, so nothing forged, garbled or replayed ever lands in the pool; the ack
goes back as one record too. A record that fails its tag ends the connection.
The cost: no zero-copy (an encrypted byte cannot go from vLLM's buffer to the socket as it is),
and AES-GCM on the host (AES-NI); benchmarks/transfer.py measures it beside the clear path.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lmcache_pd.auth import Keyring

TAG = 16
_NONCE = struct.Struct("!4xQ")


class SealError(ConnectionError):
    """A record did not verify: garbled, forged, replayed or cut short."""


class Channel:
    """Both directions of one connection, from one side's point of view."""

    def __init__(self, send_key: bytes, recv_key: bytes):
        self._send, self._recv = AESGCM(send_key), AESGCM(recv_key)
        self._sent = self._received = 0

    def seal(self, data, aad: bytes | None = None) -> bytes:
        nonce = _NONCE.pack(self._sent)
        self._sent += 1
        return self._send.encrypt(nonce, data, aad)

    def open(self, record, aad: bytes | None = None) -> bytes:
        nonce = _NONCE.pack(self._received)
        self._received += 1
        try:
            return self._recv.decrypt(nonce, bytes(record), aad)
        except InvalidTag:
            raise SealError("a tcp record failed its tag (garbled, forged or replayed): connection dropped") from None


def channel(keys: Keyring, *, sender: bool, receiver_nonce: bytes, sender_nonce: bytes) -> Channel:
    """The channel of one connection (``sender``: the prefill side's end)."""
    def key(direction: bytes) -> bytes:
        return keys.derive(b"tcp-data/" + direction, receiver_nonce, sender_nonce)

    to_receiver, to_sender = key(b"to-decode"), key(b"to-prefill")
    return Channel(to_receiver, to_sender) if sender else Channel(to_sender, to_receiver)
