"""The prefill leg's HTTP client (proxy/post.py) over real sockets, against a raw-socket server
whose answers each test scripts: keep-alive reuse, the three ways an answer's length is given,
a request never sent twice, idle connections the server closed never used, cancellation closing
the connection (vLLM aborts the request), and garbled or oversized answers refused."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from lmcache_pd.proxy.post import Broken, NotConnected, Posts

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Server:
    """Accepts connections; for each request read, ``answer(n, request)`` gives the bytes to send
    back (None: close the connection without answering). Counts connections and requests, and
    notes when a connection was closed by the client."""

    def __init__(self, answer):
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.client_closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        self.client_closed.set()
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(buf) < length:
                    buf += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buf[:length])
                buf = buf[length:]
                out = self.answer(len(self.requests), head)
                if out is None:
                    return
                conn.sendall(out)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server():
    made: list[Server] = []

    def make(answer):
        made.append(Server(answer))
        return made[-1]

    yield make
    for s in made:
        s.close()


def run(coro):
    return asyncio.run(coro)


def test_requests_share_one_kept_alive_connection(server):
    srv = server(lambda n, head: OK)

    async def go():
        posts = Posts(2.0, 2.0, 1 << 20)
        got = [await posts.post("127.0.0.1", srv.port, "/v1/completions", b'{"x":%d}' % i,
                                {"content-type": "application/json", "X-Request-Id": "r-1"}) for i in range(3)]
        posts.close()
        return got

    assert run(go()) == [(200, b"{}")] * 3
    assert srv.connections == 1 and len(srv.requests) == 3
    first = srv.requests[0]
    assert first.startswith(b"POST /v1/completions HTTP/1.1\r\n") and b"\r\nX-Request-Id: r-1\r\n" in first
    assert first.endswith(b'\r\n\r\n{"x":0}') and b"content-length: 7\r\n" in first


@pytest.mark.parametrize("answer,body", [
    (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", b"hello"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=1\r\nhel\r\n2\r\nlo\r\n0\r\nt: 1\r\n\r\n", b"hello"),
    (b"HTTP/1.1 404\r\ncontent-length: 3\r\n\r\nno!", b"no!"),
])
def test_answers_of_every_length_kind_are_read_whole(server, answer, body):
    srv = server(lambda n, head: answer)

    async def go():
        posts = Posts(2.0, 2.0, 1 << 20)
        out = [await posts.post("127.0.0.1", srv.port, "/p", b"{}", {}) for _ in range(2)]
        posts.close()
        return out

    status = 404 if b" 404" in answer else 200
    assert run(go()) == [(status, body)] * 2 and srv.connections == 1


def test_an_answer_ended_by_the_connections_close_is_read_and_the_connection_not_reused():
    class Closing(Server):
        def _serve(self, conn):
            with conn:
                self.requests.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-close")

    srv = Closing(None)

    async def go():
        posts = Posts(2.0, 2.0, 1 << 20)
        out = [await posts.post("127.0.0.1", srv.port, "/p", b"{}", {}) for _ in range(2)]
        posts.close()
        return out

    try:
        assert run(go()) == [(200, b"until-close")] * 2 and srv.connections == 2
    finally:
        srv.close()


def test_a_request_the_server_read_and_dropped_is_not_sent_again(server):
    srv = server(lambda n, head: None)  # reads it, closes without answering: it may have been processed

    async def go():
        posts = Posts(2.0, 2.0, 1 << 20)
        with pytest.raises(Broken):
            await posts.post("127.0.0.1", srv.port, "/p", b"{}", {})

    run(go())
    time.sleep(0.1)
    assert len(srv.requests) == 1 and srv.connections == 1


def test_an_idle_connection_the_server_closed_is_not_used(server):
    class ClosesWhenIdle(Server):
        def _serve(self, conn):
            data = conn.recv(65536)
            self.requests.append(data)
            conn.sendall(OK)
            conn.shutdown(socket.SHUT_RDWR)  # as uvicorn's keep-alive timeout would, while idle
            conn.close()

    srv = ClosesWhenIdle(None)

    async def go():
        posts = Posts(2.0, 2.0, 1 << 20)
        first = await posts.post("127.0.0.1", srv.port, "/p", b"{}", {})
        await asyncio.sleep(0.2)  # the close arrives while the connection is idle in the pool
        second = await posts.post("127.0.0.1", srv.port, "/p", b"{}", {})
        posts.close()
        return first, second

    try:
        assert run(go()) == ((200, b"{}"), (200, b"{}"))
        assert len(srv.requests) == 2 and srv.connections == 2  # a new connection, nothing lost or doubled
    finally:
        srv.close()


def test_connections_idle_past_keepalive_are_not_reused(server):
    srv = server(lambda n, head: OK)

    async def go():
        posts = Posts(2.0, 0.2, 1 << 20)
        await posts.post("127.0.0.1", srv.port, "/p", b"{}", {})
        await asyncio.sleep(0.3)
        await posts.post("127.0.0.1", srv.port, "/p", b"{}", {})
        posts.close()

    run(go())
    assert srv.connections == 2


def test_a_cancelled_request_closes_its_connection():
    class Silent(Server):  # reads the request, never answers, and notes the client's close
        def _serve(self, conn):
            with conn:
                self.requests.append(conn.recv(65536))
                if conn.recv(65536) == b"":
                    self.client_closed.set()

    srv = Silent(None)

    async def go():
        posts = Posts(2.0, 2.0, 1 << 20)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await posts.post("127.0.0.1", srv.port, "/p", b"{}", {})
        # (still in the running loop: nothing but the client's own close can end the connection)
        for _ in range(100):
            if srv.client_closed.is_set():
                return True
            await asyncio.sleep(0.02)
        return False

    try:
        assert run(go()), "the cancelled request's connection stayed open"
    finally:
        srv.close()


def test_refused_is_not_connected():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    async def go():
        with pytest.raises(NotConnected, match=f"127.0.0.1:{port}"):
            await Posts(2.0, 2.0, 1 << 20).post("127.0.0.1", port, "/p", b"{}", {})

    run(go())


@pytest.mark.parametrize("answer,what", [
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x answer"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 999999999\r\n\r\n", "content-length"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "invalid literal"),
])
def test_garbled_or_oversized_answers_are_broken(server, answer, what):
    srv = server(lambda n, head: answer)

    async def go():
        with pytest.raises(Broken, match=what):
            await Posts(2.0, 2.0, 1 << 20).post("127.0.0.1", srv.port, "/p", b"{}", {})

    run(go())


def test_header_values_that_would_split_the_request_are_dropped(server):
    srv = server(lambda n, head: OK)

    async def go():
        posts = Posts(2.0, 2.0, 1 << 20)
        await posts.post("127.0.0.1", srv.port, "/p", b"{}", {"X-Request-Id": "a\r\nx-evil: 1", "x-ok": "fine"})
        posts.close()

    run(go())
    assert b"x-evil" not in srv.requests[0] and b"\r\nx-ok: fine\r\n" in srv.requests[0]
