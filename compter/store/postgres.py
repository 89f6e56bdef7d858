"""PostgreSQL: debts as JSON documents with an indexed due time, shared by a fleet of processes.

The URL is asyncpg's (`postgresql://user:password@host:5432/database`), plus `?schema=NAME`
(default `public`), which names the schema that holds Compter's tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import weakref
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TypeAlias
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from compter.errors import StoreUnavailable
from compter.model import MAX_ID, Debt, Transition
from compter.store.base import Decide
from compter.store.codec import decode, encode

Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

# Every operation answers or fails within this, so a request gets its 503 in seconds, not minutes.
OPERATION_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 3.0
POOL_MAX_SIZE = 10
SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Each entry moves the schema from version i to i + 1; the version reached is recorded in compter_meta.
_MIGRATIONS = (
    """
    CREATE TABLE {s}.compter_debts (
        id bigint PRIMARY KEY,
        document jsonb NOT NULL,
        due timestamptz
    );
    CREATE INDEX compter_debts_due ON {s}.compter_debts (due, id) WHERE due IS NOT NULL;
    CREATE SEQUENCE {s}.compter_debt_ids AS bigint CYCLE;
    CREATE TABLE {s}.compter_lease (
        name text PRIMARY KEY,
        holder text NOT NULL,
        expires timestamptz NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)

# Errors that mean "the database cannot be used right now"; anything else (a `decide` error) passes through.
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PostgresStore:
    shared = True

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        self.schema = dict(query).get("schema") or "public"
        if not SCHEMA_NAME.match(self.schema):
            raise ValueError(
                f"?schema={self.schema!r} is not a PostgreSQL schema name Compter accepts: {SCHEMA_NAME.pattern}"
            )
        self._dsn = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "schema"])))
        password = parts.password
        self._secrets = {password, unquote(password)} - {""} if password is not None else set()
        s = _quote_identifier(self.schema)
        self._sql = {
            "get": f"SELECT document FROM {s}.compter_debts WHERE id = $1",
            "lock": f"SELECT document FROM {s}.compter_debts WHERE id = $1 FOR UPDATE",
            "insert": f"INSERT INTO {s}.compter_debts (id, document, due) VALUES ($1, $2, $3) "
            "ON CONFLICT (id) DO NOTHING RETURNING id",
            "update": f"UPDATE {s}.compter_debts SET document = $2, due = $3 WHERE id = $1",
            "delete": f"DELETE FROM {s}.compter_debts WHERE id = $1",
            "page": f"SELECT document FROM {s}.compter_debts WHERE id > $1 ORDER BY id LIMIT $2",
            "due": f"SELECT document FROM {s}.compter_debts WHERE due IS NOT NULL AND due <= $1 "
            "ORDER BY due, id LIMIT $2",
            "next_due": f"SELECT due FROM {s}.compter_debts WHERE due IS NOT NULL ORDER BY due, id LIMIT 1",
            "next_id": f"SELECT nextval('{s}.compter_debt_ids')",
            # Ids continue after a vivified one, so server-chosen ids rarely have to skip.
            "follow_id": f"SELECT setval('{s}.compter_debt_ids', $1) FROM {s}.compter_debt_ids WHERE last_value <= $1",
            # The lowest id >= $1 that no debt has, or NULL when every id from $1 up is taken.
            "free_id": f"""
                SELECT CASE
                    WHEN NOT EXISTS (SELECT 1 FROM {s}.compter_debts WHERE id = $1) THEN $1
                    ELSE (SELECT d.id + 1 FROM {s}.compter_debts d
                          WHERE d.id >= $1 AND d.id < {MAX_ID}
                            AND NOT EXISTS (SELECT 1 FROM {s}.compter_debts e WHERE e.id = d.id + 1)
                          ORDER BY d.id LIMIT 1)
                END""",
            # The server's clock decides expiry, so processes with skewed clocks agree on it.
            "lease": f"""
                INSERT INTO {s}.compter_lease AS lease (name, holder, expires)
                VALUES ('watcher', $1, now() + make_interval(secs => $2))
                ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires
                WHERE lease.holder = excluded.holder OR lease.expires <= now()
                RETURNING holder""",
            "release": f"DELETE FROM {s}.compter_lease WHERE name = 'watcher' AND holder = $1",
        }
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        # A lock per debt being written in this process; it goes away with its last user.
        self._turns: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()

    async def open(self) -> None:
        try:
            async with self._guard():
                # min_size=0: no connection floor for asyncpg to restore, with a traceback, every few
                # seconds of an outage. command_timeout also bounds the cancel request asyncpg sends
                # after an operation timed out.
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=0,
                    max_size=POOL_MAX_SIZE,
                    timeout=CONNECT_TIMEOUT_S,
                    command_timeout=OPERATION_TIMEOUT_S,
                    reset=_nothing_to_reset,
                )
            async with self._connection() as connection, connection.transaction():
                await self._migrate(connection)
        except (ValueError, OverflowError) as error:  # asyncpg reads the URL at the first connection
            await self.close()
            raise StoreUnavailable(f"the PostgreSQL URL is not valid: {self._describe(error)}") from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT_S):
                await pool.close()
        except (TimeoutError, *_DRIVER_ERRORS):
            pool.terminate()

    async def ping(self) -> None:
        async with self._connection() as connection:
            await connection.fetchval("SELECT 1")

    async def get(self, debt_id: int) -> Debt | None:
        async with self._connection() as connection:
            document = await connection.fetchval(self._sql["get"], debt_id)
        return decode(document) if document is not None else None

    async def page(self, *, after: int = 0, limit: int | None = None) -> list[Debt]:
        async with self._connection() as connection:
            rows = await connection.fetch(self._sql["page"], after, limit)
        return [decode(row["document"]) for row in rows]

    async def create(self, decide: Callable[[int], Transition]) -> Transition:
        async with self._connection() as connection:
            debt_id: int = await connection.fetchval(self._sql["next_id"])
            while True:
                transition = decide(debt_id)
                stored = transition.stored
                if stored is None or await connection.fetchval(
                    self._sql["insert"], debt_id, encode(stored), stored.due
                ):
                    return transition
                # Taken by a vivified debt: the next free id, wrapping to the lowest once the top is full.
                debt_id = await connection.fetchval(self._sql["free_id"], debt_id + 1 if debt_id < MAX_ID else 1)
                if debt_id is None:
                    debt_id = await connection.fetchval(self._sql["free_id"], 1)
                await connection.execute(self._sql["follow_id"], debt_id)

    async def update(self, debt_id: int, decide: Decide) -> Transition:
        async with self._connection(turn=debt_id) as connection:
            while True:
                async with connection.transaction():
                    document = await connection.fetchval(self._sql["lock"], debt_id)
                    transition = decide(decode(document) if document is not None else None)
                    if not transition.changed:
                        return transition
                    stored = transition.stored
                    if stored is None:
                        await connection.execute(self._sql["delete"], debt_id)
                        return transition
                    if document is not None:
                        await connection.execute(self._sql["update"], debt_id, encode(stored), stored.due)
                        return transition
                    if await connection.fetchval(self._sql["insert"], debt_id, encode(stored), stored.due):
                        await connection.execute(self._sql["follow_id"], debt_id)
                        return transition
                # Another process created it since we looked: decide again on its row.

    async def due(self, now: datetime, limit: int) -> list[Debt]:
        async with self._connection() as connection:
            rows = await connection.fetch(self._sql["due"], now, limit)
        return [decode(row["document"]) for row in rows]

    async def next_due(self) -> datetime | None:
        async with self._connection() as connection:
            due: datetime | None = await connection.fetchval(self._sql["next_due"])
        return due

    async def hold_lease(self, holder: str, ttl_s: float) -> bool:
        async with self._connection() as connection:
            return await connection.fetchval(self._sql["lease"], holder, ttl_s) is not None

    async def release_lease(self, holder: str) -> None:
        async with self._connection() as connection:
            await connection.execute(self._sql["release"], holder)

    async def _migrate(self, connection: Connection) -> None:
        """Create or upgrade the schema; a lock keeps processes starting together from racing."""
        s = _quote_identifier(self.schema)
        await connection.execute("SELECT pg_advisory_xact_lock(hashtext('compter:' || $1))", self.schema)
        # Looked up first: CREATE SCHEMA IF NOT EXISTS needs the right to create schemas even when it exists.
        if not await connection.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema):
            await connection.execute(f"CREATE SCHEMA {s}")
        await connection.execute(
            f"CREATE TABLE IF NOT EXISTS {s}.compter_meta (key text PRIMARY KEY, value text NOT NULL)"
        )
        found = await connection.fetchval(f"SELECT value FROM {s}.compter_meta WHERE key = 'schema_version'")
        version = int(found) if found is not None else 0
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"the PostgreSQL schema {self.schema!r} is at version {version}, newer than this Compter "
                f"knows ({SCHEMA_VERSION}): upgrade Compter"
            )
        for migration in _MIGRATIONS[version:]:
            await connection.execute(migration.format(s=s))
        await connection.execute(
            f"INSERT INTO {s}.compter_meta (key, value) VALUES ('schema_version', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            str(SCHEMA_VERSION),
        )

    @contextlib.asynccontextmanager
    async def _connection(self, turn: int | None = None) -> AsyncIterator[Connection]:
        """A pooled connection for one operation, bounded in time, its failures as StoreUnavailable.

        Operations given the same `turn` (a debt's id) take turns in this process before taking a
        connection, so payments to one busy debt queue here instead of filling the pool with
        connections that wait on one row lock (and they go faster for it).
        """
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL store is not open")
        async with (
            self._guard(),
            asyncio.timeout(OPERATION_TIMEOUT_S),
            self._turn(turn),
            self._pool.acquire() as connection,
        ):
            try:
                yield connection
            except asyncio.CancelledError:
                # Timed out (or shut down) mid-query: drop the connection rather than wait for the server to cancel.
                connection.terminate()
                raise

    def _turn(self, key: int | None) -> contextlib.AbstractAsyncContextManager[object]:
        if key is None:
            return contextlib.nullcontext()
        lock = self._turns.get(key)
        if lock is None:
            lock = self._turns[key] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except _DRIVER_ERRORS as error:
            raise StoreUnavailable(f"PostgreSQL is unavailable: {self._describe(error)}") from None

    def _describe(self, error: BaseException) -> str:
        """The driver's words, with any password taken out."""
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


async def _nothing_to_reset(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """Save the reset query on every release: Compter leaves no session state (settings, locks, LISTEN)."""


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
