"""The small JSON-over-HTTP servers of workers and of the node cache daemon (L2): a threaded
server with a bound on its handler threads, and a handler base that answers JSON, routes POSTs
with a bearer token, a bounded body and clear 4xx answers. (The proxy is FastAPI; these are the
side doors of processes that must not grow a web framework.)"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lmcache_pd.auth import Keyring
from lmcache_pd.threads import thread

log = logging.getLogger(__name__)


class BoundedServer(ThreadingHTTPServer):
    """At most ``max_connections`` handler threads; the accept loop waits for a free one instead
    of starting threads without bound."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, max_connections: int):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._thread: threading.Thread | None = None

    def start(self, name: str) -> None:
        """Serve on a thread of its own, ``name``. It sleeps until a connection comes: no turn
        every 0.2 s to look for a shutdown (on a CPU deployment, time taken from the instance's
        one core: docs/benchmarks.md); :meth:`stop` wakes it."""
        self._thread = thread(self.serve_forever, name, poll_interval=None)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving: ``shutdown`` asks (on a thread of its own: it waits for the loop), and
        a connection of our own wakes the loop to see it."""
        if self._thread is not None and self._thread.is_alive():
            thread(self.shutdown, "pd-http-stop").start()
            host, port = self.server_address[:2]
            host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
            deadline = time.monotonic() + 5
            while self._thread.is_alive() and time.monotonic() < deadline:
                try:
                    socket.create_connection((host, port), timeout=0.5).close()
                except OSError:  # (closing already)
                    pass
                self._thread.join(0.05)
        self.server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class JsonHandler(BaseHTTPRequestHandler):
    """Subclasses set ``what`` (for debug logs) and call :meth:`post` from ``do_POST``."""

    what = "HTTP API"
    protocol_version = "HTTP/1.1"
    timeout = 10.0  # every read and write of the connection (StreamRequestHandler): a silent client is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug(f"{self.what}: " + format, *args)

    def send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def json(self, status: int, obj: Any) -> None:
        self.send(status, json.dumps(obj).encode())

    def post(self, routes: Mapping[str, Callable[[dict[str, Any]], Any]], keys: Keyring, max_body: int) -> None:
        """Answer a POST: 404 for an unknown path, 401 without the bearer token (with a secret),
        400 for a body that is not a JSON object of at most ``max_body`` bytes or that the
        route refuses (ValueError), 404 for a LookupError; else 200 with the route's answer."""
        op = routes.get(self.path)
        if op is None:
            self.json(404, {"error": f"no route {self.path}"})
            return
        if not keys.authorizes(self.headers.get("authorization")):
            self.json(401, {"error": "missing or wrong bearer token (`lmcache-pd token` prints it)"})
            return
        try:
            n = int(self.headers.get("content-length") or 0)
            if not 0 <= n <= max_body:  # a negative length would read to the end of the stream
                raise ValueError(f"content-length {n} outside [0, {max_body}]")
            body = json.loads(self.rfile.read(n) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            self.json(200, op(body))
        except (ValueError, json.JSONDecodeError) as e:
            self.close_connection = True  # what is left of its body would be read as a request
            self.json(400, {"error": str(e)})
        except LookupError as e:
            self.json(404, {"error": str(e)})
