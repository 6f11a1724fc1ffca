"""Test helper: a scripted vLLM-like instance for proxy tests (serve its ``app`` with the ``serve``
fixture)."""

from __future__ import annotations

from fastapi import FastAPI, Request


class Scripted:
    """A vLLM-like instance: keeps every completion request's body and answers it (``answer``)."""

    def __init__(self) -> None:
        self.app, self.seen = FastAPI(), []

        @self.app.get("/health")
        async def health() -> dict:
            return {}

        @self.app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.seen.append(body)
            return await self.answer(body)

    async def answer(self, body: dict):
        raise NotImplementedError
