"""What only the Redis store does: key prefixes, exact id order past 2^53, passwords, and outages.

The generic operations are in test_store_contract.py (`-k redis`). The outage tests start a
private `redis-server` on a free port, so that stopping it disturbs no other test.
"""

import concurrent.futures
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from redis.asyncio.connection import SSLConnection

from compter import model
from compter.errors import StoreUnavailable
from compter.model import MAX_ID, Debt, Transition
from compter.store import redact, store_from_url
from compter.store.redis import LOCK_WAIT_S, TIMEOUT_S, RedisStore
from tests.fakes import T0
from tests.realprocess import free_port, start_compter
from tests.stores import drop_namespace, store_url_for
from tests.test_cli import compter

REDIS_SERVER = shutil.which("redis-server")


def require_redis_server() -> str:
    """The redis-server binary; skip without it (fail under CI=true, like tests/stores.py)."""
    if REDIS_SERVER is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and redis-server is not installed")
        pytest.skip("redis-server is not installed")
    return REDIS_SERVER


@dataclass
class PrivateRedis:
    """A redis-server of this test's own, with an append-only file, that the test may stop and start."""

    port: int
    directory: Path
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"]
        self.process = subprocess.Popen(
            [require_redis_server(), *options, "--dir", str(self.directory), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        """Shut it down cleanly: it writes its append-only file, as Redis does on SIGTERM."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def client(self, password: str | None = None) -> redis.Redis:
        return redis.Redis(port=self.port, password=password, socket_timeout=5)

    def _answers(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, "redis-server exited"
        try:
            with self.client(password=_password_of(self.extra)) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False


def _password_of(extra: tuple[str, ...]) -> str | None:
    return extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `condition` held; fails the test past `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(free_port(), tmp_path)
    server.start()
    yield server
    if server.process is not None:
        server.signal(signal.SIGCONT)  # in case the test left it stopped
    server.stop()


@pytest.fixture
def redis_url(namespace: str, tmp_path: Path) -> Iterator[str]:
    """A fresh prefix on the shared Redis of tests/stores.py."""
    yield store_url_for("redis", namespace, tmp_path)
    drop_namespace("redis", namespace)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url)
    await store.open()
    yield store
    await store.close()


def recurring(debt_id: int) -> Debt:
    return Debt(id=debt_id, created=T0, updated=T0, interval=60.0)


async def put(store: RedisStore, debt: Debt) -> None:
    await store.update(debt.id, lambda before: Transition(before, debt))


async def create(store: RedisStore) -> int:
    transition = await store.create(lambda debt_id: model.create(debt_id, {"interval": 60.0}, T0, None))
    assert transition.answer is not None
    return transition.answer.id


# --- keys and prefixes ------------------------------------------------------------------------------


async def test_every_key_lives_under_its_prefix_and_prefixes_do_not_see_each_other(
    private_redis: PrivateRedis,
) -> None:
    default, other = RedisStore(private_redis.url), RedisStore(f"{private_redis.url}?prefix=other:")
    await default.open()
    await other.open()
    try:
        await put(default, recurring(5))
        assert await create(default) == 6
        assert await other.get(5) is None
        assert await create(other) == 1  # its own id counter
        assert await other.hold_lease("other-holder", 10)
        assert await default.hold_lease("default-holder", 10)  # its own lease
        assert [debt.id for debt in await default.page()] == [5, 6]
        assert [debt.id for debt in await other.page()] == [1]
        assert [debt.id for debt in await other.due(T0.replace(year=2100), 10)] == [1]
        await default.update(5, lambda before: model.delete(before, 5, T0))
        assert await other.next_due() is not None
    finally:
        await default.close()
        await other.close()
    with private_redis.client() as client:
        keys = sorted(key.decode() for key in client.keys("*"))
    assert keys == sorted(
        [f"{prefix}{name}" for prefix in ("compter:", "other:") for name in ("due", "ids", "next_id", "lease")]
        + ["compter:debt:6", "other:debt:1"]
    )


async def test_ids_keep_their_exact_order_past_2_to_the_53(store: RedisStore) -> None:
    ids = [MAX_ID, 2**53 + 1, 5, 2**53, MAX_ID - 1, 2**53 + 2]
    for debt_id in ids:
        await put(store, recurring(debt_id))
    assert [debt.id for debt in await store.page()] == sorted(ids)
    assert [debt.id for debt in await store.page(after=2**53, limit=2)] == [2**53 + 1, 2**53 + 2]
    assert [debt.id for debt in await store.page(after=MAX_ID - 1)] == [MAX_ID]
    assert await store.page(after=10**20) == []
    # The id counter is at the top: a new debt takes the lowest free id.
    assert await create(store) == 1


@pytest.mark.parametrize(("query", "named"), [("prefx=typo:", "prefx"), ("socket_timeout=soon", "socket_timeout")])
def test_a_misspelt_or_bad_url_option_is_a_value_error_that_names_it(query: str, named: str) -> None:
    with pytest.raises(ValueError, match=named) as raised:
        RedisStore(f"redis://:s3cret-pw@127.0.0.1:1/0?{query}")
    assert "s3cret-pw" not in str(raised.value)


# --- passwords ----------------------------------------------------------------------------------------


async def test_a_wrong_password_is_store_unavailable_that_hides_it(tmp_path: Path) -> None:
    server = PrivateRedis(free_port(), tmp_path, ("--requirepass", "right-pw-4711"))
    server.start()
    try:
        wrong = f"redis://:wrong-pw-0815@127.0.0.1:{server.port}/0"
        with pytest.raises(StoreUnavailable) as raised:
            await RedisStore(wrong).open()
        assert "wrong-pw-0815" not in str(raised.value)
        assert redact(wrong) in str(raised.value)
        right = RedisStore(f"redis://:right-pw-4711@127.0.0.1:{server.port}/0")
        await right.open()
        await right.close()
        refused = compter("serve", "--port", str(free_port()), "--store", wrong)
    finally:
        server.stop()
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "wrong-pw-0815" not in refused.stderr + refused.stdout
    assert "cannot open the store" in refused.stderr


# --- outages, with a real `compter serve` ---------------------------------------------------------------


@dataclass
class Load:
    """Clients paying one debt as fast as they can, keeping every answer."""

    url: str
    answers: list[httpx.Response]
    stop: threading.Event

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    self.answers.append(client.post(self.url))
                except httpx.TransportError as error:
                    pytest.fail(f"compter did not answer a payment: {error!r}")

    def count(self, status: int) -> int:
        return sum(answer.status_code == status for answer in list(self.answers))


def test_redis_going_away_under_load_answers_503_and_compter_recovers_by_itself(
    private_redis: PrivateRedis,
) -> None:
    with start_compter("--store", private_redis.url) as server:
        created = httpx.post(f"{server.url}/debts", json={"name": "busy", "interval": 3600})
        debt_url = server.url + created.headers["Location"]
        load = Load(debt_url, [], threading.Event())
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            running = [pool.submit(load.run) for _ in range(8)]
            wait_for(lambda: load.count(200) >= 50, 30, "payments before the outage")

            private_redis.stop()
            wait_for(lambda: load.count(503) >= 20, 15, "503 answers while redis is down")
            refused = httpx.post(debt_url, timeout=10)
            assert refused.status_code == 503
            assert refused.headers["Content-Type"].startswith("application/json")
            assert "redis" in refused.json()["error"]
            assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 503
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200

            private_redis.start()
            recovered_in_s = wait_for(
                lambda: httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200, 15, "ready again"
            )
            answered_before = load.count(200)
            wait_for(lambda: load.count(200) >= answered_before + 50, 30, "payments after the outage")
            load.stop.set()
            for future in running:
                future.result()
        statuses = {answer.status_code for answer in load.answers}
        assert statuses == {200, 503}
        assert all("error" in answer.json() for answer in load.answers if answer.status_code == 503)
        payments = httpx.get(debt_url).json()["payments"]
        # Every answered payment counts; one refused in flight may have reached Redis before it went away.
        assert load.count(200) <= payments <= load.count(200) + load.count(503)
        assert server.process.poll() is None
        assert "Traceback" not in server.output()
    print(f"ready {recovered_in_s:.2f} s after redis came back; {load.count(503)} payments answered 503")


def test_a_hung_redis_answers_503_within_seconds_and_compter_recovers(private_redis: PrivateRedis) -> None:
    with start_compter("--store", private_redis.url) as server:
        created = httpx.post(f"{server.url}/debts", json={"name": "patient", "interval": 3600})
        debt_url = server.url + created.headers["Location"]
        private_redis.signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda _: httpx.post(debt_url, timeout=30), range(4)))
            waited_s = time.monotonic() - started
            assert [answer.status_code for answer in answers] == [503] * 4
            assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 503
        finally:
            private_redis.signal(signal.SIGCONT)
        # One waits for its turn behind another, then for its own read: with room for a loaded machine.
        assert waited_s < LOCK_WAIT_S + TIMEOUT_S + 2
        wait_for(lambda: httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200, 15, "ready again")
        paid = httpx.post(debt_url, timeout=10)
        assert paid.status_code == 200
        # The payments refused while Redis hung may still have reached it, before the one that was answered.
        assert 1 <= paid.json()["payments"] <= 5
    print(f"4 payments to a hung redis answered 503 in {waited_s:.2f} s")


def test_rediss_is_redis_over_tls() -> None:
    store = store_from_url("rediss://:pw@redis.internal:6380/0")
    assert isinstance(store, RedisStore)
    assert store._redis.connection_pool.connection_class is SSLConnection
