"""What crosses between clients and the proxy (L6): bounded request bodies, and answers without
our hand-off parameters.

vLLM puts ``kv_transfer_params`` into its answers (the prefill's token count, digest and
transfer id; error texts). They are ours, not the client's: every answer the proxy relays is
scrubbed of them, whole answers and server-sent events alike (an event is passed on as soon as
it is complete; only events that name the field are rewritten).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request

FIELD = "kv_transfer_params"
_NEEDLE = FIELD.encode()
REPORT_HEADER = "x-lmcache-pd-handoff"
"""With ``proxy.handoff_report``, a non-streamed answer carries the decode's hand-off report here."""


JSON_HEADERS = {"content-type": "application/json"}
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


def encode(body: dict[str, Any]) -> bytes:
    """A request body as JSON. msgspec, not the json module: a prompt of 8192 token ids is some
    45 KB, written on the way to the first token; msgspec writes it in a tenth of the time."""
    return _ENCODER.encode(body)


def token_ids(prompt: Any) -> bool:
    """``prompt`` is a non-empty list of token ids (integers; JSON's true and false are not),
    checked without a Python loop over 8192 items."""
    if not isinstance(prompt, list) or not prompt:
        return False
    try:
        msgspec.convert(prompt, list[int], strict=True)
    except msgspec.ValidationError:
        return False
    return True


class BodyError(ValueError):
    """The request body is refused: ``status`` says how (400 or 413)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object, read no further than ``max_bytes`` (``proxy.max_body_mib``)."""
    declared = request.headers.get("content-length")
    too_large = f"request body larger than {max_bytes} bytes (proxy.max_body_mib)"
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise BodyError(413 if declared.isdigit() else 400, too_large if declared.isdigit()
                        else "bad content-length")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:  # chunked, or a length that lied: stop reading
            raise BodyError(413, too_large)
    try:
        body = _DECODER.decode(raw)  # strict JSON (no NaN); a third of json.loads's time
    except msgspec.DecodeError as e:
        raise BodyError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BodyError(400, "request body must be a JSON object")
    return body


def scrub(body: bytes) -> tuple[bytes, Any]:
    """A whole answer without ``kv_transfer_params`` (unchanged if it has none or is not JSON),
    and what the field held (None if nothing)."""
    if _NEEDLE not in body:
        return body, None
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body, None
    if isinstance(obj, dict) and FIELD in obj:
        params = obj.pop(FIELD)
        return json.dumps(obj).encode(), params
    return body, None


def _scrub_event(event: bytes) -> bytes:
    if _NEEDLE not in event:
        return event
    lines = event.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data:") and _NEEDLE in line:
            lines[i] = b"data: " + scrub(line[5:].strip())[0]
    return b"\n".join(lines)


async def scrub_events(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Server-sent events without ``kv_transfer_params``: each complete event as it comes."""
    buf = b""

    async def chunks() -> AsyncIterator[bytes]:
        if first:
            yield first
        async for chunk in rest:
            yield chunk

    async for chunk in chunks():
        buf += chunk
        end = buf.rfind(b"\n\n")
        if end < 0:
            continue
        done, buf = buf[:end + 2], buf[end + 2:]
        if _NEEDLE in done:
            done = b"\n\n".join(_scrub_event(e) for e in done.split(b"\n\n"))
        yield done
    if buf:
        yield _scrub_event(buf)


def ended_early(name: str, e: BaseException) -> bytes:
    """The error event that ends a stream the decode stopped answering (past its deadline, or broken)."""
    msg = {"error": {"message": f"decode {name} stream ended early: {type(e).__name__}: {e}",
                     "type": "timeout" if isinstance(e, TimeoutError) else "bad_gateway"}}
    return f"data: {json.dumps(msg)}\n\n".encode()


async def events(items: list[bytes]) -> AsyncIterator[bytes]:
    """Ready-made events as a stream's body."""
    for item in items:
        yield item


def one_line(text: bytes) -> bytes:
    """An answer's body as one server-sent event's data (an error in the middle of a stream)."""
    try:
        return json.dumps(json.loads(text), separators=(",", ":")).encode()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return json.dumps({"error": {"message": text.decode(errors="replace")[:500], "type": "bad_gateway"}}).encode()
