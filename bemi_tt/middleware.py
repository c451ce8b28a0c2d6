"""``BemiFastAPIMiddleware``: a pure ASGI middleware that sets the context for one request.

    app.add_middleware(BemiFastAPIMiddleware, set_context=lambda request: {"user_id": ..., "endpoint": ...})

``set_context`` (sync or async) receives a ``starlette.requests.Request`` when Starlette is installed
(without access to the body, which belongs to the endpoint), otherwise the raw ASGI scope; it returns a
dict or ``None``. The context lives in the request's own contextvars copy: async endpoints, sync endpoints
and dependencies run in the thread pool see it, and it is restored when the response is done.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from bemi_tt.context import activate, encode_context, restore

__all__ = ["BemiFastAPIMiddleware"]

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
ContextFactory = Callable[[Any], "Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None"]


def _request(scope: Scope) -> Any:
    try:
        from starlette.requests import Request
    except ImportError:  # plain ASGI without Starlette: hand over the scope
        return scope
    return Request(scope)


class BemiFastAPIMiddleware:
    """Set the bemi_tt context of each HTTP/WebSocket request from ``set_context(request)``."""

    def __init__(self, app: ASGIApp, set_context: ContextFactory) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, got {type(app).__name__}")
        if not callable(set_context):
            raise TypeError(
                f"set_context must be a callable taking the request, got {type(set_context).__name__}"
            )
        self.app = app
        self.set_context = set_context

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        value = self.set_context(_request(scope))
        if inspect.isawaitable(value):
            value = await value
        token = activate(encode_context(value))
        try:
            await self.app(scope, receive, send)
        finally:
            restore(token)
