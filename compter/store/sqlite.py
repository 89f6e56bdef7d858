"""The SQLite store: one file on one machine, durable across a crash of the process.

One connection, used by one dedicated thread: the event loop never waits on the disk,
transactions never interleave, and a payment costs one hop to that thread.
"""

import asyncio
import re
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from compter.errors import StoreUnavailable
from compter.model import MAX_ID, Debt, Transition
from compter.store.base import Decide
from compter.store.codec import decode, due_timestamp, encode

T = TypeVar("T")

# Migration n (counted from 1) takes the schema from version n - 1 to n; PRAGMA user_version records n.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # AUTOINCREMENT: sqlite_sequence remembers the highest id ever stored, vivified ones included.
        # `document` is compter.store.codec's JSON; `due` its due time in Unix seconds, NULL when never due.
        "CREATE TABLE debts (id INTEGER PRIMARY KEY AUTOINCREMENT, document TEXT NOT NULL, due REAL)",
        "CREATE INDEX debts_due ON debts (due) WHERE due IS NOT NULL",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
SYNCHRONOUS = ("normal", "full")
BUSY_TIMEOUT_S = 5.0

_UPSERT = (
    "INSERT INTO debts (id, document, due) VALUES (?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET document = excluded.document, due = excluded.due"
)
_LOWEST_FREE_ID = f"""
    SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM debts WHERE id = 1)
    UNION ALL
    SELECT id + 1 FROM debts AS taken
    WHERE id < {MAX_ID} AND NOT EXISTS (SELECT 1 FROM debts WHERE id = taken.id + 1)
    ORDER BY 1 LIMIT 1
"""


class SQLiteStore:
    """`sqlite:///absolute/path.db` or `sqlite://relative/path.db`, option `?synchronous=normal|full`."""

    shared = False

    def __init__(self, url: str) -> None:
        self.path, self.synchronous = parse_url(url)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compter-sqlite")
        self._connection: sqlite3.Connection | None = None

    async def open(self) -> None:
        try:
            self._connection = await asyncio.get_running_loop().run_in_executor(self._thread, self._connect)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"cannot open the SQLite database {self.path}: {error}") from None
        finally:
            if self._connection is None:  # nothing to serve: let the thread go
                self._thread.shutdown()

    async def close(self) -> None:
        if self._connection is not None:
            await self._call(lambda connection: connection.close())
            self._connection = None
        self._thread.shutdown()

    async def ping(self) -> None:
        await self._call(lambda connection: connection.execute("SELECT 1 FROM debts LIMIT 1").fetchall())

    async def get(self, debt_id: int) -> Debt | None:
        row = await self._call(
            lambda connection: connection.execute("SELECT document FROM debts WHERE id = ?", (debt_id,)).fetchone()
        )
        return decode(row[0]) if row is not None else None

    async def page(self, *, after: int = 0, limit: int | None = None) -> list[Debt]:
        rows = await self._call(
            lambda connection: connection.execute(
                "SELECT document FROM debts WHERE id > ? ORDER BY id LIMIT ?", (after, -1 if limit is None else limit)
            ).fetchall()
        )
        return [decode(document) for (document,) in rows]

    async def create(self, decide: Callable[[int], Transition]) -> Transition:
        return await self._call(lambda connection: _create(connection, decide))

    async def update(self, debt_id: int, decide: Decide) -> Transition:
        return await self._call(lambda connection: _update(connection, debt_id, decide))

    async def due(self, now: datetime, limit: int) -> list[Debt]:
        rows = await self._call(
            lambda connection: connection.execute(
                "SELECT document FROM debts WHERE due <= ? ORDER BY due LIMIT ?", (now.timestamp(), limit)
            ).fetchall()
        )
        return [decode(document) for (document,) in rows]

    async def next_due(self) -> datetime | None:
        (due,) = await self._call(
            lambda connection: connection.execute("SELECT min(due) FROM debts WHERE due IS NOT NULL").fetchone()
        )
        return datetime.fromtimestamp(due, UTC) if due is not None else None

    async def hold_lease(self, holder: str, ttl_s: float) -> bool:
        return True

    async def release_lease(self, holder: str) -> None:
        pass

    def _connect(self) -> sqlite3.Connection:
        """Runs on the store's thread, which then owns the connection."""
        # isolation_level=None: transactions are begun explicitly, with BEGIN IMMEDIATE.
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute(f"PRAGMA synchronous = {self.synchronous}")
            _migrate(connection, self.path)
        except BaseException:
            connection.close()
            raise
        return connection

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the store's thread; a database error becomes StoreUnavailable."""
        connection = self._connection
        if connection is None:
            raise StoreUnavailable(f"the SQLite store {self.path} is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work, connection)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"the SQLite database {self.path}: {error}") from None


def parse_url(url: str) -> tuple[str, str]:
    """The database file and the `synchronous` setting a URL names; ValueError saying how to fix it."""
    parts = urlsplit(url)
    # sqlite:////abs/path.db (SQLAlchemy's spelling of an absolute path) names /abs/path.db too.
    path = re.sub(r"^/+", "/", unquote(parts.netloc + parts.path))
    if not path:
        raise ValueError(f"{url!r} names no file: use sqlite:///absolute/path.db or sqlite://relative/path.db")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    synchronous = options.pop("synchronous", "normal").lower()
    if options:
        raise ValueError(f"unknown option(s) in the sqlite URL: {', '.join(options)}; the one option is synchronous")
    if synchronous not in SYNCHRONOUS:
        raise ValueError(f"?synchronous={synchronous} in the sqlite URL: use normal or full")
    return path, synchronous


def _migrate(connection: sqlite3.Connection, path: str) -> None:
    connection.execute("BEGIN IMMEDIATE")
    with connection:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{path} has schema version {version}, newer than this Compter ({SCHEMA_VERSION}): upgrade Compter"
            )
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number}")


def _update(connection: sqlite3.Connection, debt_id: int, decide: Decide) -> Transition:
    connection.execute("BEGIN IMMEDIATE")
    with connection:  # commits, or rolls back if anything (decide included) raises
        row = connection.execute("SELECT document FROM debts WHERE id = ?", (debt_id,)).fetchone()
        transition = decide(decode(row[0]) if row is not None else None)
        if transition.changed:
            _write(connection, debt_id, transition.stored)
    return transition


def _create(connection: sqlite3.Connection, decide: Callable[[int], Transition]) -> Transition:
    connection.execute("BEGIN IMMEDIATE")
    with connection:
        debt_id = _free_id(connection)
        transition = decide(debt_id)
        _write(connection, debt_id, transition.stored)
    return transition


def _free_id(connection: sqlite3.Connection) -> int:
    """The id after the highest ever stored; once the top was used, the lowest free one."""
    row = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'debts'").fetchone()
    highest: int = row[0] if row is not None else 0
    if highest < MAX_ID:
        return highest + 1
    free = connection.execute(_LOWEST_FREE_ID).fetchone()
    if free is None:
        raise StoreUnavailable("every debt id is in use")
    lowest: int = free[0]
    return lowest


def _write(connection: sqlite3.Connection, debt_id: int, stored: Debt | None) -> None:
    if stored is None:
        connection.execute("DELETE FROM debts WHERE id = ?", (debt_id,))
    else:
        connection.execute(_UPSERT, (debt_id, encode(stored), due_timestamp(stored)))
