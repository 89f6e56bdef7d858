"""The store URLs every store test runs against, each test in a fresh namespace of its own.

PostgreSQL and Redis are found through COMPTER_TEST_POSTGRES_URL and COMPTER_TEST_REDIS_URL.
When one does not answer, its tests skip with the reason, except under CI=true, where they fail.
"""

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

POSTGRES_URL = os.environ.get("COMPTER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("COMPTER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
STORE_KINDS = ["memory", "sqlite", "postgresql", "redis"]
SHARED_KINDS = ["postgresql", "redis"]


def require_server(url: str) -> None:
    """Skip (fail under CI=true) unless the server a URL names accepts connections."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or {"postgresql": 5432, "redis": 6379}[parts.scheme]
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as error:
        variable = f"COMPTER_TEST_{parts.scheme.removesuffix('ql').upper()}_URL"
        reason = f"{parts.scheme} is not reachable at {host}:{port} ({error}); set {variable}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)


def _with_query(url: str, key: str, value: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{key}={value}"


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def store_url_for(kind: str, namespace: str, tmp_path: Path) -> str:
    """A URL of that kind whose data no other test sees."""
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / namespace}.db"
    if kind == "postgresql":
        require_server(POSTGRES_URL)
        return _with_query(POSTGRES_URL, "schema", namespace)
    require_server(REDIS_URL)
    return _with_query(REDIS_URL, "prefix", f"{namespace}:")


def drop_namespace(kind: str, namespace: str) -> None:
    """Remove what a test left in the shared servers."""
    if kind == "postgresql":
        import asyncpg

        async def drop() -> None:
            connection = await asyncpg.connect(POSTGRES_URL)
            try:
                await connection.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
            finally:
                await connection.close()

        asyncio.run(drop())
    elif kind == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.fixture(params=STORE_KINDS)
def store_url(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> Iterator[str]:
    """Every store, one after the other: the contract suite runs once per URL."""
    kind: str = request.param
    url = store_url_for(kind, namespace, tmp_path)
    yield url
    drop_namespace(kind, namespace)


@pytest.fixture(params=SHARED_KINDS)
def shared_store_url(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> Iterator[str]:
    """The stores a fleet of processes can share."""
    kind: str = request.param
    url = store_url_for(kind, namespace, tmp_path)
    yield url
    drop_namespace(kind, namespace)
