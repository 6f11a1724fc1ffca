"""The proxy sends a request once more when its connection failed before any response (a
kept-alive connection the server was closing), over real sockets."""

from __future__ import annotations

import asyncio
import socket
import threading

import httpx
import pytest

from lmcache_pd.proxy.app import _RESEND, _send_once_more


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


@pytest.mark.parametrize("drops,answered", [(0, True), (1, True), (2, False)])
def test_a_request_is_sent_once_more_only(drops, answered):
    srv, seen = flaky_server(drops)
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/v1/completions"

    async def go():
        async with httpx.AsyncClient() as client:
            return await _send_once_more(lambda: client.post(url, json={"x": 1}), "test request")

    try:
        if answered:
            assert asyncio.run(go()).status_code == 200
        else:
            with pytest.raises(_RESEND):  # closed unread, the kernel may reset it: a ReadError then
                asyncio.run(go())
        assert len(seen) == min(drops + 1, 2)  # never a third time
    finally:
        srv.close()
