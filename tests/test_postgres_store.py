"""What only the PostgreSQL store promises: its schema option, migrations, and outages survived.

The generic operations are in test_store_contract.py (`-k postgresql`). Outages are made with a
TCP proxy between Compter and PostgreSQL that can drop every connection and refuse new ones
(`cut`), or hold connections open without forwarding a byte (`stall`), as a lost network does.
"""

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from compter import model
from compter.errors import StoreUnavailable
from compter.model import PaymentRequest
from compter.store.postgres import OPERATION_TIMEOUT_S, SCHEMA_VERSION, PostgresStore
from tests.fakes import T0
from tests.realprocess import free_port, spawn_compter, start_compter
from tests.stores import POSTGRES_URL, drop_namespace, store_url_for
from tests.test_cli import compter

T = TypeVar("T")


class TcpProxy:
    """Forwards a local port to PostgreSQL from a thread of its own, until told to fail."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._mode = "forward"
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()  # clear while stalled
        self._flowing.set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Drop every connection and refuse new ones, as a server that went away."""
        self._set_mode("cut")

    def stall(self) -> None:
        """Forward nothing more, on open or new connections, as a network that drops packets."""
        self._set_mode("stall")

    def restore(self) -> None:
        self._set_mode("forward")

    def close(self) -> None:
        self._set_mode("cut")
        self._server.close()

        async def finish() -> None:
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

        self._call(finish())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def _set_mode(self, mode: str) -> None:
        async def apply() -> None:
            self._mode = mode
            if mode == "stall":
                self._flowing.clear()
            else:
                self._flowing.set()
            if mode == "cut":
                for writer in list(self._writers):
                    writer.transport.abort()

        self._call(apply())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        if self._mode == "cut":
            writer.transport.abort()
            return
        self._writers.add(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(upstream_writer)
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        for each in (writer, upstream_writer):
            each.transport.abort()
            self._writers.discard(each)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                await self._flowing.wait()
                if self._mode == "cut":
                    break
                writer.write(chunk)
                await writer.drain()
        writer.transport.abort()


def through(proxy: TcpProxy, url: str, password: str | None = None) -> str:
    """The same URL, reaching PostgreSQL through the proxy (and sending a password if given)."""
    parts = urlsplit(url)
    user = f"{parts.username}:{password}" if password is not None else parts.username
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{proxy.port}"))


@pytest.fixture
def pg_url(namespace: str, tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL store URL in a schema of this test's own, dropped afterwards."""
    url = store_url_for("postgresql", namespace, tmp_path)
    yield url
    drop_namespace("postgresql", namespace)


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    target = urlsplit(POSTGRES_URL)
    running = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    yield running
    running.close()


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def sql(query: str, *args: object) -> list[asyncpg.Record]:
    """Run a query as an operator would, on a connection of its own."""
    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        return await connection.fetch(query, *args)
    finally:
        await connection.close()


async def vivify(store: PostgresStore, debt_id: int, interval: float = 60.0) -> None:
    request = PaymentRequest({"interval": interval})
    await store.update(debt_id, lambda debt: model.pay(debt, debt_id, request, T0, None))


# --- schema and URL ---------------------------------------------------------------------------------


async def test_tables_live_in_the_schema_the_url_names_created_if_missing(pg_url: str, namespace: str) -> None:
    assert not await sql("SELECT 1 FROM pg_namespace WHERE nspname = $1", namespace)
    async with opened(pg_url) as store:
        await vivify(store, 5, interval=30.0)
    tables = await sql("SELECT table_name FROM information_schema.tables WHERE table_schema = $1", namespace)
    assert {row["table_name"] for row in tables} == {"compter_debts", "compter_lease", "compter_meta"}
    [row] = await sql(f"SELECT id, due, document->>'payments' AS payments FROM \"{namespace}\".compter_debts")
    assert (row["id"], row["due"], row["payments"]) == (5, T0 + timedelta(seconds=30), "1")


async def test_a_user_that_may_only_use_its_own_schema_is_enough(pg_url: str, namespace: str) -> None:
    role = f"{namespace}_owner"
    await sql(f'CREATE ROLE "{role}" LOGIN')
    try:
        await sql(f'CREATE SCHEMA "{namespace}" AUTHORIZATION "{role}"')
        async with opened(pg_url.replace("postgres@", f"{role}@", 1)) as store:
            await vivify(store, 3)
            assert [debt.id for debt in await store.page()] == [3]
    finally:
        await sql(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        await sql(f'DROP ROLE "{role}"')


async def test_other_url_options_reach_the_driver(pg_url: str, namespace: str) -> None:
    async with opened(f"{pg_url}&application_name=compter-{namespace}"):
        rows = await sql("SELECT 1 FROM pg_stat_activity WHERE application_name = $1", f"compter-{namespace}")
    assert rows


@pytest.mark.parametrize("schema", ["a;drop", "x y", "9lives", "a" * 64])
def test_a_schema_name_compter_cannot_quote_safely_is_refused(schema: str) -> None:
    with pytest.raises(ValueError, match="schema"):
        PostgresStore(f"{POSTGRES_URL}?schema={schema}")


async def test_the_schema_version_is_recorded_and_opening_again_migrates_nothing(pg_url: str, namespace: str) -> None:
    def tables() -> Coroutine[Any, Any, list[asyncpg.Record]]:
        return sql(
            "SELECT relname, oid FROM pg_class WHERE relnamespace = $1::regnamespace ORDER BY relname", namespace
        )

    # Several processes starting at once on an empty schema: one migrates, the others wait and see it done.
    stores = [PostgresStore(pg_url) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        await vivify(stores[0], 9)
        assert [debt.id for debt in await stores[3].page()] == [9]
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    created = await tables()
    async with opened(pg_url) as again:
        assert [debt.id for debt in await again.page()] == [9]
    assert await tables() == created
    meta = await sql(f'SELECT key, value FROM "{namespace}".compter_meta')
    assert [tuple(row) for row in meta] == [("schema_version", str(SCHEMA_VERSION))]


async def test_a_schema_newer_than_this_compter_is_refused_with_what_to_do(pg_url: str, namespace: str) -> None:
    async with opened(pg_url):
        pass
    await sql(f'UPDATE "{namespace}".compter_meta SET value = $1', str(SCHEMA_VERSION + 1))
    with pytest.raises(StoreUnavailable, match="upgrade Compter"):
        await PostgresStore(pg_url).open()


async def test_the_watcher_reads_due_debts_from_the_index_never_by_a_scan(pg_url: str, namespace: str) -> None:
    async with opened(pg_url) as store:
        # 20,000 debts: half never due (plain ones), half due over the next hours.
        await sql(
            f'INSERT INTO "{namespace}".compter_debts (id, document, due) '
            "SELECT n, '{}', CASE WHEN n % 2 = 0 THEN $1::timestamptz + n * interval '1 second' END "
            "FROM generate_series(1, 20000) AS n",
            T0,
        )
        await sql(f'ANALYZE "{namespace}".compter_debts')
        for query, args in [(store._sql["due"], (T0 + timedelta(minutes=1), 100)), (store._sql["next_due"], ())]:
            plan = "\n".join(row[0] for row in await sql(f"EXPLAIN {query}", *args))
            assert "Index Scan using compter_debts_due" in plan or "Index Only Scan using compter_debts_due" in plan
            assert "Seq Scan" not in plan


# --- concurrency ------------------------------------------------------------------------------------


async def test_payments_to_one_busy_debt_take_turns_before_taking_a_connection(pg_url: str, namespace: str) -> None:
    """So they never fill the pool with connections waiting on one row lock, leaving none to other debts."""
    async with opened(f"{pg_url}&application_name=compter-{namespace}") as store:
        await vivify(store, 1)
        payments = asyncio.gather(*(vivify(store, 1) for _ in range(200)))
        waits = []
        while not payments.done():
            waits.append(
                await sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    f"compter-{namespace}",
                )
            )
        await payments
        debt = await store.get(1)
        assert debt is not None
        assert debt.payments == 201
    assert len(waits) > 3
    assert {rows[0][0] for rows in waits} == {0}


# --- outages, in the process ----------------------------------------------------------------------


async def test_operations_fail_fast_while_postgresql_is_away_and_recover_by_themselves(
    pg_url: str, proxy: TcpProxy
) -> None:
    async with opened(through(proxy, pg_url)) as store:
        await vivify(store, 1)
        proxy.cut()
        for operation in (store.ping, lambda: store.get(1), lambda: vivify(store, 1), store.next_due):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="PostgreSQL is unavailable"):
                await operation()
            assert time.monotonic() - started < 2
        proxy.restore()
        await vivify(store, 1)
        debt = await store.get(1)
        assert debt is not None
        assert debt.payments == 2


async def test_a_silent_network_fails_operations_within_the_timeout(pg_url: str, proxy: TcpProxy) -> None:
    async with opened(through(proxy, pg_url)) as store:
        await store.ping()
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get(1)
        took = time.monotonic() - started
        assert OPERATION_TIMEOUT_S - 0.5 < took < OPERATION_TIMEOUT_S + 3
        proxy.restore()
        assert await store.get(1) is None


async def test_no_error_shows_the_password(pg_url: str, proxy: TcpProxy) -> None:
    password = "pw-Sekr%2Et"  # PostgreSQL here trusts any password; the URL carries it percent-encoded
    async with opened(through(proxy, pg_url, password)) as store:
        proxy.cut()
        errors = []
        for operation in (store.ping, lambda: store.get(1), lambda: vivify(store, 1)):
            with pytest.raises(StoreUnavailable) as caught:
                await operation()
            errors.append(str(caught.value))
    for message in errors:
        assert "pw-Sekr" not in message


# --- a real `compter serve` ---------------------------------------------------------------------------


class PaymentLoad:
    """Clients paying one debt in a loop from threads, each answer recorded, until stopped."""

    def __init__(self, url: str, payers: int = 8) -> None:
        self._url = url
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: list[tuple[int, float, dict[str, Any]]] = []  # status, seconds taken, body
        self.failures: list[str] = []  # requests that got no answer at all
        self._pool = ThreadPoolExecutor(payers)
        self._running = [self._pool.submit(self._pay) for _ in range(payers)]

    def count(self, status: int) -> int:
        with self._lock:
            return sum(1 for answer in self.answers if answer[0] == status)

    def wait_for(self, status: int, more: int, timeout_s: float = 30) -> None:
        """Until `more` answers with `status` than there are now came in."""
        target = self.count(status) + more
        deadline = time.monotonic() + timeout_s
        while self.count(status) < target:
            assert time.monotonic() < deadline, f"fewer than {more} more answers {status} in {timeout_s} s"
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for running in self._running:
            running.result()
        self._pool.shutdown()

    def _pay(self) -> None:
        with httpx.Client(timeout=20) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post(self._url)
                except httpx.HTTPError as error:
                    with self._lock:
                        self.failures.append(repr(error))
                    continue
                with self._lock:
                    self.answers.append((response.status_code, time.monotonic() - started, response.json()))


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_compter_will_not_start_on_a_silent_postgresql_and_says_why_in_one_line(pg_url: str, proxy: TcpProxy) -> None:
    proxy.stall()
    started = time.monotonic()
    done = compter("serve", "--port", str(free_port()), "--store", through(proxy, pg_url, "pw-Sekr%2Et"))
    assert time.monotonic() - started < OPERATION_TIMEOUT_S + 10  # a few seconds, not the driver's default minute
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("compter: error: cannot open the store postgresql://postgres:***@")
    assert "PostgreSQL is unavailable: TimeoutError" in line
    assert "pw-Sekr" not in done.stderr + done.stdout


def test_compter_answers_503_while_postgresql_is_away_and_recovers_by_itself(pg_url: str, proxy: TcpProxy) -> None:
    with start_compter("--store", through(proxy, pg_url)) as server:
        created = httpx.post(f"{server.url}/debts", json={"name": "busy", "interval": "1h"})
        assert created.status_code == 201
        debt_url = server.url + created.headers["Location"]
        load = PaymentLoad(debt_url)
        try:
            load.wait_for(200, 50)
            proxy.cut()
            load.wait_for(503, 50)
            ready = httpx.get(f"{server.url}/readyz", timeout=10)
            assert (ready.status_code, "PostgreSQL is unavailable" in ready.json()["error"]) == (503, True)
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
            proxy.restore()
            wait_until(lambda: httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200, 10, "ready again")
            load.wait_for(200, 50)
        finally:
            load.stop()
        assert server.process.poll() is None
        assert "Traceback" not in server.output(), "an outage is a line in the log, not a traceback"
        assert load.failures == []
        statuses = {status for status, _, _ in load.answers}
        assert statuses == {200, 503}
        unavailable = [(took, body) for status, took, body in load.answers if status == 503]
        assert all("PostgreSQL is unavailable" in body["error"] for _, body in unavailable)
        assert max(took for took, _ in unavailable) < OPERATION_TIMEOUT_S + 2
        # Every answered payment is counted; one cut between its commit and its answer may count too.
        payments = httpx.get(debt_url).json()["payments"]
        assert load.count(200) <= payments <= load.count(200) + len(unavailable)


def test_answered_payments_survive_kill_9(pg_url: str) -> None:
    server = spawn_compter("--store", pg_url)
    try:
        recurring = httpx.post(f"{server.url}/debts", json={"name": "nightly", "interval": "1d"}).json()
        deploy = httpx.post(f"{server.url}/debts", json={"timeout": "1h", "stages": ["build", "test"]}).json()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(
                pool.map(lambda _: httpx.post(f"{server.url}/debts/{recurring['id']}").status_code, range(200))
            )
        vivified = httpx.post(f"{server.url}/debts/777", json={"interval": "1h"})
        staged = httpx.post(f"{server.url}/debts/{deploy['id']}", json={"payment": "build"})
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
    finally:
        server.stop(signal.SIGKILL)
        server.log.close()
    assert statuses == [200] * 200
    assert (vivified.status_code, staged.status_code) == (201, 200)
    with start_compter("--store", pg_url) as again:
        assert httpx.get(f"{again.url}/debts/{recurring['id']}").json()["payments"] == 200
        assert httpx.get(f"{again.url}/debts/777").json()["payments"] == 1
        after = httpx.get(f"{again.url}/debts/{deploy['id']}").json()
        assert ([paid["name"] for paid in after["paid"]], after["status"]) == (["build"], "open")
