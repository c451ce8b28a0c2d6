"""BemiFastAPIMiddleware: each request's context is seen by its async and sync endpoints and
dependencies, and by nothing else; proven with concurrent requests writing through real engines."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from sqlalchemy.ext.asyncio import create_async_engine
from wal_messages import create_slot, read_events, row_contexts, without_sql

import bemi_tt.hook  # noqa: F401  (activates the hook)
from bemi_tt.context import get_context, set_context
from bemi_tt.middleware import BemiFastAPIMiddleware
from bemi_tt.triggers import install


@pytest.fixture(autouse=True)
def _no_context() -> Iterator[None]:
    set_context(None)
    yield
    set_context(None)


def user_context(request: Request) -> dict[str, Any] | None:
    user = request.headers.get("x-user")
    return None if user is None else {"user": user, "endpoint": request.url.path}


async def async_user_context(request: Request) -> dict[str, Any] | None:
    await asyncio.sleep(0)
    return user_context(request)


def sync_dependency() -> dict[str, Any]:
    return get_context()


async def async_dependency() -> dict[str, Any]:
    return get_context()


def make_app(factory: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BemiFastAPIMiddleware, set_context=factory)

    @app.get("/async")
    async def in_async(
        sync_dep: dict[str, Any] = Depends(sync_dependency),  # noqa: B008
        async_dep: dict[str, Any] = Depends(async_dependency),  # noqa: B008
    ) -> dict[str, Any]:
        await asyncio.sleep(random.random() / 1000)
        return {"endpoint": get_context(), "sync_dep": sync_dep, "async_dep": async_dep}

    @app.get("/sync")
    def in_sync(sync_dep: dict[str, Any] = Depends(sync_dependency)) -> dict[str, Any]:  # noqa: B008
        return {"endpoint": get_context(), "sync_dep": sync_dep, "async_dep": get_context()}

    return app


async def _get_all(app: FastAPI, requests: list[tuple[str, str | None]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(
            client.get(path, headers={} if user is None else {"x-user": user}) for path, user in requests
        ))


@pytest.mark.parametrize("factory", [user_context, async_user_context], ids=["sync-factory", "async-factory"])
def test_each_request_sees_only_its_own_context_in_endpoints_and_dependencies(factory: Any) -> None:
    requests = [(random.choice(["/async", "/sync"]), f"user-{i}" if i % 5 else None) for i in range(60)]
    responses = asyncio.run(_get_all(make_app(factory), requests))
    for (path, user), response in zip(requests, responses, strict=True):
        assert response.status_code == 200
        expected = {} if user is None else {"user": user, "endpoint": path}
        assert response.json() == {"endpoint": expected, "sync_dep": expected, "async_dep": expected}
    assert get_context() == {}


def test_context_does_not_leak_out_of_the_request() -> None:
    set_context({"outside": True})
    asyncio.run(_get_all(make_app(user_context), [("/async", "u")]))
    assert get_context() == {"outside": True}


def test_invalid_context_from_the_factory_fails_the_request_clearly() -> None:
    with pytest.raises(TypeError, match="not JSON"):
        asyncio.run(_get_all(make_app(lambda request: {"bad": object()}), [("/async", "u")]))


def test_non_http_scopes_pass_through_without_calling_the_factory() -> None:
    calls: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(scope["type"])

    def factory(request: Any) -> dict[str, Any]:
        raise AssertionError("must not be called for lifespan")

    asyncio.run(BemiFastAPIMiddleware(app, set_context=factory)({"type": "lifespan"}, None, None))
    assert calls == ["lifespan"]


@pytest.mark.parametrize(("app", "factory"), [(None, user_context), (lambda *a: None, "user")])
def test_middleware_rejects_non_callables(app: Any, factory: Any) -> None:
    with pytest.raises(TypeError, match="must be"):
        BemiFastAPIMiddleware(app, set_context=factory)


def test_concurrent_requests_record_each_users_context_in_the_wal(
    pg_server: Any, database: str, engine: sa.Engine, dsn: str
) -> None:
    metadata = sa.MetaData()
    notes = sa.Table(
        "notes", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("owner", sa.Text)
    )
    metadata.create_all(engine)
    install(engine)
    create_slot(dsn)
    async_engine = create_async_engine(pg_server.sqlalchemy_url(database, "psycopg_async"), pool_size=10)

    app = FastAPI()
    app.add_middleware(BemiFastAPIMiddleware, set_context=user_context)

    @app.post("/async/{note_id}")
    async def write_async(note_id: int, request: Request) -> dict[str, int]:
        await asyncio.sleep(random.random() / 1000)
        async with async_engine.begin() as conn:
            await conn.execute(notes.insert().values(id=note_id, owner=request.headers["x-user"]))
        return {"id": note_id}

    @app.post("/sync/{note_id}")
    def write_sync(note_id: int, request: Request) -> dict[str, int]:
        with engine.begin() as conn:
            conn.execute(notes.insert().values(id=note_id, owner=request.headers["x-user"]))
        return {"id": note_id}

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            try:
                return await asyncio.gather(*(
                    client.post(f"/{'async' if i % 2 else 'sync'}/{i}", headers={"x-user": f"user-{i % 7}"})
                    for i in range(80)
                ))
            finally:
                await async_engine.dispose()

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 80
    changes = row_contexts(read_events(dsn))
    assert len(changes) == 80
    for event, ctx in changes:
        match = re.search(rb"id\[integer\]:(\d+) owner\[text\]:'([^']*)'", event.content)
        assert match, event.content
        note_id, owner = int(match.group(1)), match.group(2).decode()
        path = f"/{'async' if note_id % 2 else 'sync'}/{note_id}"
        assert without_sql(ctx) == {"user": owner, "endpoint": path}
