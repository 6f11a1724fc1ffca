"""Exception hierarchy (L0). Errors carry the request/transfer and the peer they concern.

A timeout names the config field that bounds it, so an operator knows what to raise.
"""

from __future__ import annotations


class PDError(Exception):
    """Base of every lmcache-pd error."""


class ConfigError(PDError, ValueError):
    """Invalid configuration: names the field and where it came from."""

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None):
        where = ""
        if field:
            where += f"field `{field}`"
        if source:
            where += f"{' in ' if where else ''}{source}"
        super().__init__(f"{where}: {message}" if where else message)
        self.field = field
        self.source = source


class ProtocolError(PDError):
    """A control message that is malformed, forged or of an unknown version."""


class IncompatiblePeer(ProtocolError):
    """The peer's compatibility info differs; ``fields`` lists what differs."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = fields


class TransferError(PDError):
    """A hand-off failed; the decode side recomputes."""

    def __init__(self, message: str, *, transfer_id: str | None = None, peer: str | None = None):
        ctx = ", ".join(f"{k}={v}" for k, v in (("transfer", transfer_id), ("peer", peer)) if v)
        super().__init__(f"{message} ({ctx})" if ctx else message)
        self.transfer_id = transfer_id
        self.peer = peer


class TransferTimeout(TransferError):
    """A deadline passed. The message names the config field that sets it."""

    def __init__(self, what: str, *, config_field: str, seconds: float, **ctx: str | None):
        super().__init__(f"{what} timed out after {seconds:g} s (raise `{config_field}` to wait longer)", **ctx)
        self.config_field = config_field


class PeerLost(TransferError):
    """The peer is unreachable or restarted (new incarnation)."""


class PoolExhausted(TransferError):
    """The decode pool cannot hold the request now (or ever, if ``too_large``)."""

    def __init__(self, message: str, *, too_large: bool = False, **ctx: str | None):
        super().__init__(message, **ctx)
        self.too_large = too_large


class TransportUnavailable(PDError):
    """A registered transport cannot run here (missing library or device)."""
