"""The workers' small HTTP servers (http_api.py): asleep until a connection comes, stopped at once."""

from __future__ import annotations

import json
import time
import urllib.request

from lmcache_pd.http_api import BoundedServer, JsonHandler


class Hello(JsonHandler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self.json(200, {"hello": self.path})


def test_an_idle_server_takes_no_turn_answers_and_stops_at_once():
    turns: list[float] = []
    srv = BoundedServer(("127.0.0.1", 0), Hello, max_connections=2)
    srv.service_actions = lambda: turns.append(time.monotonic())  # (serve_forever calls it every turn)
    srv.start("pd-test-api")
    try:
        time.sleep(0.7)
        assert turns == [], "the idle loop woke up to look for a shutdown"
        port = srv.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/x", timeout=5) as r:
            assert json.loads(r.read()) == {"hello": "/x"}
        assert len(turns) == 1  # the request's turn
    finally:
        t0 = time.monotonic()
        srv.stop()
    assert time.monotonic() - t0 < 2 and not srv._thread.is_alive()


def test_stopping_a_server_that_never_started_closes_it():
    srv = BoundedServer(("127.0.0.1", 0), Hello, max_connections=2)
    srv.stop()
    assert srv.socket.fileno() == -1
