"""A real `compter serve` on each persistent store, killed with SIGKILL and started again.

What was answered must be there after the restart, exactly, and what fell due while
Compter was down must be acted on as soon as it is back.
"""

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.otlp_receiver import Received, receiver
from tests.otlp_receiver import wait_for as otlp_wait_for
from tests.realprocess import RunningCompter, free_port, start_compter
from tests.stores import drop_namespace, store_url_for
from tests.test_cli import compter
from tests.test_fleet import overdue_series, wait_for
from tests.test_otlp import otlp_env

PERSISTENT_KINDS = ["sqlite", "postgresql", "redis"]


@pytest.fixture(params=PERSISTENT_KINDS)
def persistent_store_url(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> Iterator[str]:
    kind: str = request.param
    yield store_url_for(kind, namespace, tmp_path)
    drop_namespace(kind, namespace)


def post(server: RunningCompter, path: str, body: object = None, want: int = 200) -> dict[str, Any]:
    response = httpx.post(server.url + path, json=body, timeout=10)
    assert response.status_code == want, response.text
    answer: dict[str, Any] = response.json()
    return answer


def debts(server: RunningCompter) -> dict[int, dict[str, Any]]:
    return {debt["id"]: debt for debt in httpx.get(f"{server.url}/debts", timeout=10).json()}


def kill(server: RunningCompter) -> None:
    server.process.kill()
    server.process.wait(10)


async def pay_many(server: RunningCompter, paths: list[str], clients: int, payments_each: int) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

        async def payer(n: int) -> None:
            for i in range(payments_each):
                response = await client.post(paths[(n + i) % len(paths)])
                assert response.status_code == 200, response.text

        await asyncio.gather(*(payer(n) for n in range(clients)))


def test_every_answered_payment_and_debt_survives_kill_9(persistent_store_url: str) -> None:
    with start_compter("--store", persistent_store_url) as server:
        recurring = post(server, "/debts", {"name": "nightly-backup", "interval": 3600, "grace": 60.5}, want=201)
        plain = post(server, "/debts", {"name": "counter"}, want=201)
        deploy = post(server, "/debts", {"name": "deploy", "timeout": 3600, "stages": ["build", "test", "ship"]}, 201)
        missed = post(server, "/debts", {"name": "missed", "interval": 0.5}, want=201)
        vivified = post(server, "/debts/9000", {"name": "vivid", "interval": "1h"}, want=201)
        asyncio.run(pay_many(server, [f"/debts/{recurring['id']}", f"/debts/{plain['id']}"], 16, 20))
        wait_for(lambda: overdue_series(server).get(str(missed["id"])) == 1, 5, "the watcher's overdue")
        last = {missed["id"]: debts(server)[missed["id"]]}
        last[recurring["id"]] = post(server, f"/debts/{recurring['id']}")
        last[plain["id"]] = post(server, f"/debts/{plain['id']}", {"name": "renamed"})
        post(server, f"/debts/{deploy['id']}?payment=build")
        last[vivified["id"]] = post(server, "/debts/9000")
        last[deploy["id"]] = post(server, f"/debts/{deploy['id']}", {"payment": "test"})
        kill(server)  # right after the last answer

    assert last[recurring["id"]]["payments"] + last[plain["id"]]["payments"] == 16 * 20 + 2
    assert [payment["name"] for payment in last[deploy["id"]]["paid"]] == ["build", "test"]
    assert last[missed["id"]]["status"] == "overdue"
    with start_compter("--store", persistent_store_url) as again:
        assert debts(again) == last
        wait_for(lambda: overdue_series(again).get(str(missed["id"])) == 1, 5, "the overdue gauge, resumed")
        paid_off = post(again, f"/debts/{deploy['id']}", {"payment": "ship", "payoff": True})
        assert paid_off["status"] == "paid_off"
        assert [payment["name"] for payment in paid_off["paid"]] == ["build", "test", "ship"]
        assert httpx.get(f"{again.url}/debts/{deploy['id']}").status_code == 404
        recovered = post(again, f"/debts/{missed['id']}")
        assert (recovered["status"], recovered["payments"]) == ("ok", 1)
        created = post(again, "/debts", want=201)
        assert created["id"] > 9000


def test_payments_answered_before_a_kill_in_mid_stream_all_count(persistent_store_url: str) -> None:
    clients, kill_after = 8, 300
    with start_compter("--store", persistent_store_url) as server:
        path = f"/debts/{post(server, '/debts', {'interval': 3600}, want=201)['id']}"
        answered = 0

        async def pay_until_killed() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

                async def payer() -> None:
                    nonlocal answered
                    while True:
                        response = await client.post(path)
                        assert response.status_code == 200
                        answered += 1
                        if answered == kill_after:
                            kill(server)  # while the other clients' payments are in flight

                try:
                    async with asyncio.TaskGroup() as payers:
                        for _ in range(clients):
                            payers.create_task(payer())
                except* httpx.TransportError:
                    pass

        asyncio.run(pay_until_killed())
    with start_compter("--store", persistent_store_url) as again:
        payments = httpx.get(again.url + path).json()["payments"]
    # Payments in flight at the kill may or may not have counted; every answered one has.
    assert answered >= kill_after
    assert answered <= payments <= answered + clients


def test_deadlines_that_passed_while_down_are_acted_on_at_start(persistent_store_url: str) -> None:
    with start_compter("--store", persistent_store_url) as server:
        missed = post(server, "/debts", {"name": "missed-while-down", "interval": 2}, want=201)
        deploy = post(server, "/debts", {"name": "deploy", "timeout": 2, "stages": ["build"]}, want=201)
        post(server, f"/debts/{deploy['id']}?payment=build")
        kill(server)
    deadline = datetime.fromisoformat(deploy["deadline"]).timestamp()
    time.sleep(max(0.0, deadline - time.time() + 0.2))  # both deadlines are past, with no Compter running

    with start_compter("--store", persistent_store_url) as again:
        started = time.monotonic()
        wait_for(lambda: httpx.get(f"{again.url}/debts/{deploy['id']}").status_code == 404, 5, "the timeout")
        wait_for(lambda: overdue_series(again).get(str(missed["id"])) == 1, 5, "the overdue")
        acted_s = time.monotonic() - started
        assert httpx.get(f"{again.url}/debts/{missed['id']}").json()["status"] == "overdue"
    # Compter acts within 1 s; the rest is margin for a loaded machine's polling.
    assert acted_s < 2.5


def test_a_trace_and_an_announced_overdue_carry_on_after_kill_9(persistent_store_url: str) -> None:
    """Seen by a collector: one trace across both processes, one overdue and one recovery."""
    with receiver("http/protobuf") as (endpoint, received):
        env = otlp_env(endpoint, "http/protobuf")
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        with start_compter("--store", persistent_store_url, env=env) as server:
            response = httpx.post(
                f"{server.url}/debts",
                json={"name": "deploy", "timeout": 3600, "stages": ["build", "ship"]},
                headers={"traceparent": traceparent},
            )
            assert response.status_code == 201
            deploy = response.json()
            missed = post(server, "/debts", {"name": "missed", "interval": 1}, want=201)
            post(server, f"/debts/{deploy['id']}?payment=build")
            otlp_wait_for(lambda: [span for span in received.spans() if span.name == "build"], what="the build span")
            otlp_wait_for(lambda: overdues(received, missed["id"]) == 1, what="the overdue event")
            kill(server)

        with start_compter("--store", persistent_store_url, env=env) as again:
            post(again, f"/debts/{deploy['id']}", {"payment": "ship", "payoff": True})
            spans = otlp_wait_for(
                lambda: found if len(found := received.spans()) >= 3 else None, what="the ship and root spans"
            )
            time.sleep(1.5)  # the watcher has long looked at the debt that was overdue before the kill
            recovered = post(again, f"/debts/{missed['id']}")
            assert recovered["status"] == "ok"
            otlp_wait_for(lambda: "compter.debt.recovered" in events(received, missed["id"]), what="the recovery")

    by_name = {span.name: span for span in spans}
    (root,) = [span for span in spans if span.name not in {"build", "ship"}]
    assert {span.trace_id.hex() for span in spans} == {"4bf92f3577b34da6a3ce929d0e0e4736"}
    assert root.parent_span_id.hex() == "00f067aa0ba902b7"
    assert by_name["build"].parent_span_id == by_name["ship"].parent_span_id == root.span_id
    assert root.start_time_unix_nano == round(datetime.fromisoformat(deploy["created"]).timestamp() * 1e6) * 1000
    assert events(received, missed["id"]).count("compter.debt.overdue") == 1


def overdues(received: Received, debt_id: int) -> int:
    return events(received, debt_id).count("compter.debt.overdue")


def events(received: Received, debt_id: int) -> list[str]:
    return [
        record.event_name for record in received.records() if record.attributes.get("compter.debt.id") == str(debt_id)
    ]


def test_a_store_that_cannot_be_opened_is_one_line_and_exit_2() -> None:
    result = compter("serve", "--port", str(free_port()), "--store", "sqlite:///nonexistent-dir/x.db")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("compter: error: ")
    assert "/nonexistent-dir/x.db" in lines[0]
