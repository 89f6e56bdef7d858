"""Many `compter serve` processes on one PostgreSQL or Redis store behave as one service."""

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable

import httpx
import pytest

from tests.realprocess import RunningCompter, start_compter
from tests.test_cli import compter

PAYERS = 32
PAYMENTS_EACH = 40


def overdue_series(server: RunningCompter) -> dict[str, float]:
    """compter_debt_overdue by debt id, as this process's /metrics shows it."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    found = re.findall(r'^compter_debt_overdue\{[^}]*compter_debt_id="(\d+)"[^}]*\} (\S+)$', text, re.MULTILINE)
    return {debt_id: float(value) for debt_id, value in found}


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - started


async def pay_concurrently(urls: list[str], debt_path: str) -> list[int]:
    """PAYERS clients, each paying PAYMENTS_EACH times, spread over the processes."""
    async with httpx.AsyncClient(timeout=30) as client:

        async def payer(n: int) -> list[int]:
            statuses = []
            for i in range(PAYMENTS_EACH):
                response = await client.post(urls[(n + i) % len(urls)] + debt_path)
                statuses.append(response.status_code)
            return statuses

        results = await asyncio.gather(*(payer(n) for n in range(PAYERS)))
    return [status for statuses in results for status in statuses]


def test_two_processes_count_every_payment_exactly_once(shared_store_url: str) -> None:
    with start_compter("--store", shared_store_url) as one, start_compter("--store", shared_store_url) as two:
        created = httpx.post(f"{one.url}/debts", json={"name": "shared", "interval": 3600})
        assert created.status_code == 201
        path = created.headers["Location"]
        statuses = asyncio.run(pay_concurrently([one.url, two.url], path))
        assert statuses == [200] * PAYERS * PAYMENTS_EACH
        for server in (one, two):
            assert httpx.get(server.url + path).json()["payments"] == PAYERS * PAYMENTS_EACH


def test_vivifying_one_id_from_two_processes_creates_it_once(shared_store_url: str) -> None:
    with start_compter("--store", shared_store_url) as one, start_compter("--store", shared_store_url) as two:

        async def vivify() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as client:
                responses = await asyncio.gather(
                    *(client.post(f"{url}/debts/4242", json={"interval": "1h"}) for url in [one.url, two.url] * 16)
                )
            return [response.status_code for response in responses]

        statuses = asyncio.run(vivify())
        assert sorted(statuses) == [200] * 31 + [201]
        assert httpx.get(f"{two.url}/debts/4242").json()["payments"] == 32


def test_the_lease_holder_alone_reports_gauges_and_another_takes_over_when_it_dies(shared_store_url: str) -> None:
    with start_compter("--store", shared_store_url) as first:
        debt = httpx.post(f"{first.url}/debts", json={"name": "watched", "interval": 1}).json()
        debt_id = str(debt["id"])
        wait_for(lambda: overdue_series(first).get(debt_id) == 1, 5, "overdue on the first process")
        with start_compter("--store", shared_store_url) as second:
            time.sleep(1.5)  # several of the second's lease attempts
            assert overdue_series(second) == {}, "a process without the lease reports fleet gauges"
            first.stop(signal.SIGKILL)
            took_over_s = wait_for(lambda: overdue_series(second).get(debt_id) == 1, 10, "takeover")
            assert took_over_s < 5 + 1  # the lease expires, the next attempt takes it (plus a scrape)


def test_a_debt_paid_in_time_through_another_process_never_reads_overdue(shared_store_url: str) -> None:
    with start_compter("--store", shared_store_url) as holder:
        wait_for(lambda: "took the store's lease" in holder.output(), 5, "the first process holds the lease")
        with start_compter("--store", shared_store_url) as other:
            debt_id = str(httpx.post(f"{other.url}/debts", json={"interval": 2}).json()["id"])
            seen: list[float] = []
            until = time.monotonic() + 7  # past the holder's 5 s reload of every debt
            while time.monotonic() < until:
                assert httpx.post(f"{other.url}/debts/{debt_id}").status_code == 200
                for _ in range(3):
                    seen.extend(value for key, value in overdue_series(holder).items() if key == debt_id)
                    time.sleep(0.1)
            assert seen, "the holder reports the debt"
            assert set(seen) == {0.0}, "paid every half second with a 2 s interval, it was never overdue"


def test_a_holder_stopped_by_sigterm_hands_the_lease_over_at_once(shared_store_url: str) -> None:
    with start_compter("--store", shared_store_url) as first:
        debt_id = str(httpx.post(f"{first.url}/debts", json={"interval": 1}).json()["id"])
        wait_for(lambda: overdue_series(first).get(debt_id) == 1, 5, "overdue on the first process")
        with start_compter("--store", shared_store_url) as second:
            time.sleep(1)
            assert overdue_series(second) == {}
            assert first.stop(signal.SIGTERM) == 0
            took_over_s = wait_for(lambda: overdue_series(second).get(debt_id) == 1, 10, "takeover")
            # Well under the lease's 3 s time to live: the lease was released, not left to expire.
            assert took_over_s < 2.5
        assert "released the store's lease" in first.output()


def test_workers_share_the_port_and_the_store_and_stop_cleanly(shared_store_url: str) -> None:
    with start_compter("--store", shared_store_url, "--workers", "2") as server:
        path = httpx.post(f"{server.url}/debts", json={"interval": 3600}).headers["Location"]
        statuses = asyncio.run(pay_concurrently([server.url], path))
        assert statuses == [200] * PAYERS * PAYMENTS_EACH
        assert httpx.get(server.url + path).json()["payments"] == PAYERS * PAYMENTS_EACH
        assert server.stop(signal.SIGTERM) == 0
        assert "Traceback" not in server.output()


def test_when_a_worker_dies_the_other_is_stopped_and_compter_exits_non_zero(shared_store_url: str) -> None:
    with start_compter("--store", shared_store_url, "--workers", "2") as server:
        pids = re.search(r"supervising 2 workers \(pids (\d+), (\d+)\)", server.output())
        assert pids, server.output()
        killed, other = (int(pid) for pid in pids.groups())
        os.kill(killed, signal.SIGKILL)
        assert server.process.wait(15) == signal.SIGKILL
        assert f"worker {killed} exited with -9: stopping the others" in server.output()
        with pytest.raises(ProcessLookupError):
            os.kill(other, 0)


@pytest.mark.parametrize("store", ["memory://", "sqlite:///tmp/compter-workers.db"])
def test_workers_are_refused_on_a_store_one_process_owns(store: str) -> None:
    result = compter("serve", "--workers", "2", "--store", store)
    assert result.returncode == 2
    assert "postgresql:// or redis://" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
