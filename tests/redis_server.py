"""A real redis-server process for tests (the Debian package; scripts/setup installs it)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import redis

from lmcache_pd.cli.local import free_ports


def free_port() -> int:
    return free_ports(1)[0]


class RedisServer:
    """``start()`` / ``kill()`` / ``start()`` again on the same port; ``url`` stays valid."""

    def __init__(self, *extra_args: str, password: str | None = None):
        """``password``: the server requires it (``requirepass``); ``url`` then carries it."""
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed: scripts/setup installs the Debian package "
                               "redis-server (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self.extra_args = (*extra_args, *(("--requirepass", password) if password else ()))
        self.dir = tempfile.mkdtemp(prefix="lmcache-pd-redis-")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=0.5).ping()
                return self
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
