"""The proxy sends a request once more only when it cannot have reached the backend (its write
failed), over real sockets: a request the backend read and then closed the connection on may
have been processed, and a completion is never computed twice."""

from __future__ import annotations

import asyncio
import socket
import threading

import aiohttp
import pytest

from lmcache_pd.proxy.legs import RESEND, send_once_more, session


def flaky_server(drop_first: int) -> tuple[socket.socket, list[int]]:
    """Reads each request; closes the first ``drop_first`` connections without answering."""
    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[int] = []

    def run() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(65536)
            seen.append(1)
            if len(seen) > drop_first:
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")
            conn.close()

    threading.Thread(target=run, daemon=True).start()
    return srv, seen


@pytest.mark.parametrize("drops", [0, 1])
def test_a_request_the_backend_read_is_never_sent_again(drops):
    srv, seen = flaky_server(drops)
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/v1/completions"

    async def go():
        async with session(2.0) as client:  # the proxy's own client
            r = await send_once_more(lambda: client.post(url, data=b'{"x": 1}'), "test request")
            r.release()
            return r.status

    try:
        if drops == 0:
            assert asyncio.run(go()) == 200
        else:
            with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):  # it may have been processed
                asyncio.run(go())
        assert len(seen) == 1
    finally:
        srv.close()


def test_a_request_that_could_not_be_written_is_sent_once_more():
    calls: list[int] = []

    async def send():
        calls.append(1)
        if len(calls) == 1:
            raise RESEND[0]("Cannot write to closing transport")
        return "answered"

    assert asyncio.run(send_once_more(send, "test request")) == "answered" and len(calls) == 2
    assert RESEND == (aiohttp.ClientConnectionResetError,)  # aiohttp's "not written" (legs.RESEND)
