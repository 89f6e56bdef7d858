"""Multi-stage debts end to end: the API, the watcher's timeout, the payoff-vs-timeout race, a real process."""

import asyncio
import random
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from quart.typing import TestClientProtocol as Client

from compter.errors import NotFound
from compter.model import EventKind, PaymentRequest
from compter.service import Service
from compter.store import store_from_url
from compter.store.memory import MemoryStore
from tests.fakes import T0, FakeClock, RecordingTelemetry
from tests.realprocess import start_compter
from tests.test_api import DEBT_KEYS, call, create
from tests.test_watcher import wait_for_event, watching

DEPLOY = {"name": "deploy-web", "timeout": "15m", "stages": ["build", "test", "deploy"]}
FINAL_KINDS = {EventKind.PAID_OFF, EventKind.TIMED_OUT}


async def test_a_multi_stage_debt_reads_exactly_so(client: Client) -> None:
    status, debt, headers = await call(client, "POST", "/debts", DEPLOY)
    assert (status, headers["Location"]) == (201, "/debts/1")
    assert list(debt) == DEBT_KEYS
    assert debt == {
        "id": 1,
        "name": "deploy-web",
        "created": "2026-12-03T19:00:00.123456Z",
        "updated": "2026-12-03T19:00:00.123456Z",
        "payments": 0,
        "interval": None,
        "grace": 0,
        "timeout": 900,
        "stages": ["build", "test", "deploy"],
        "paid": [],
        "deadline": "2026-12-03T19:15:00.123456Z",
        "status": "open",
    }


async def test_a_deploy_pays_each_stage_then_pays_off_and_is_cleared(
    client: Client, clock: FakeClock, telemetry: RecordingTelemetry
) -> None:
    debt = await create(client, DEPLOY)
    clock.advance(60)
    status, built, _ = await call(client, "POST", "/debts/1", {"payment": "build"})
    assert (status, built["status"], built["payments"], built["updated"]) == (200, "open", 1, built["paid"][0]["at"])
    assert built["paid"] == [{"name": "build", "at": "2026-12-03T19:01:00.123456Z"}]
    assert built["deadline"] == debt["deadline"]
    clock.advance(120)
    status, tested, _ = await call(client, "POST", "/debts/1?payment=test")
    assert (status, [paid["name"] for paid in tested["paid"]]) == (200, ["build", "test"])
    assert (await call(client, "GET", "/debts/1"))[1] == tested
    clock.advance(30)
    status, final, _ = await call(client, "POST", "/debts/1?payment=deploy&payoff=true")
    assert status == 200
    assert final == {
        **debt,
        "updated": "2026-12-03T19:03:30.123456Z",
        "payments": 3,
        "paid": [
            {"name": "build", "at": "2026-12-03T19:01:00.123456Z"},
            {"name": "test", "at": "2026-12-03T19:03:00.123456Z"},
            {"name": "deploy", "at": "2026-12-03T19:03:30.123456Z"},
        ],
        "status": "paid_off",
    }
    assert (await call(client, "GET", "/debts/1"))[0] == 404
    assert (await call(client, "GET", "/debts"))[1] == []
    assert telemetry.kinds() == ["created", "paid", "paid", "paid", "paid_off"]
    assert [(event.payment, event.since) for event in telemetry.events if event.kind is EventKind.PAID] == [
        ("build", T0),
        ("test", T0 + timedelta(seconds=60)),
        ("deploy", T0 + timedelta(seconds=180)),
    ]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/debts/1?payoff=true", None),
        ("/debts/1", {"payoff": True}),
        ("/debts/1?payoff=true", {"payoff": True}),
        ("/debts/1?payoff=true", {"payment": "deploy"}),
        ("/debts/1?payment=deploy", {"payment": "deploy", "payoff": True}),
    ],
)
async def test_payoff_by_body_or_query_with_or_without_a_last_stage(
    client: Client, telemetry: RecordingTelemetry, path: str, body: object
) -> None:
    await create(client, DEPLOY)
    status, final, _ = await call(client, "POST", path, body)
    assert (status, final["status"], final["payments"]) == (200, "paid_off", 1)
    named = "deploy" in path or "payment" in (body or {})
    assert [paid["name"] for paid in final["paid"]] == (["deploy"] if named else [])
    assert (await call(client, "GET", "/debts/1"))[0] == 404
    assert telemetry.kinds() == ["created", "paid", "paid_off"]


async def test_a_retried_or_skipped_stage_is_accepted(client: Client, telemetry: RecordingTelemetry) -> None:
    await create(client, DEPLOY)
    for stage in ["test", "build", "build"]:
        assert (await call(client, "POST", f"/debts/1?payment={stage}"))[0] == 200
    status, final, _ = await call(client, "POST", "/debts/1?payoff=true")
    assert (status, final["status"]) == (200, "paid_off")
    assert [paid["name"] for paid in final["paid"]] == ["test", "build", "build"]
    paid_off = telemetry.events[-1]
    assert (paid_off.kind, paid_off.debt.missing_stages) == (EventKind.PAID_OFF, ("deploy",))


async def test_an_unnamed_payment_counts_and_keeps_the_debt_open(client: Client) -> None:
    await create(client, DEPLOY)
    status, paid, _ = await call(client, "POST", "/debts/1")
    assert (status, paid["status"], paid["payments"], paid["paid"]) == (200, "open", 1, [])


async def test_a_payment_with_a_timeout_vivifies_a_lost_deploy(client: Client, telemetry: RecordingTelemetry) -> None:
    status, debt, headers = await call(client, "POST", "/debts/77?payment=build", DEPLOY)
    assert (status, headers["Location"]) == (201, "/debts/77")
    assert (debt["id"], debt["status"], debt["payments"], debt["timeout"], debt["stages"]) == (
        77,
        "open",
        1,
        900,
        ["build", "test", "deploy"],
    )
    assert debt["paid"] == [{"name": "build", "at": debt["created"]}]
    assert (await call(client, "GET", "/debts/77"))[1] == debt
    status, final, _ = await call(client, "POST", "/debts/77?payment=deploy&payoff=true", DEPLOY)
    assert (status, final["status"], final["payments"]) == (200, "paid_off", 2)
    assert telemetry.kinds() == ["vivified", "paid", "paid", "paid_off"]


async def test_a_vivifying_payoff_answers_201_paid_off_and_keeps_nothing(client: Client) -> None:
    status, final, headers = await call(client, "POST", "/debts/78?payoff=true", {"timeout": 60})
    assert (status, headers["Location"], final["status"], final["payments"]) == (201, "/debts/78", "paid_off", 1)
    assert (await call(client, "GET", "/debts/78"))[0] == 404


async def test_a_payment_after_payoff_is_404(client: Client) -> None:
    await create(client, DEPLOY)
    await call(client, "POST", "/debts/1?payoff=true")
    status, answer, _ = await call(client, "POST", "/debts/1?payment=deploy")
    assert status == 404
    assert "`timeout`" in answer["error"]


# (debt to create, path, body, what the error mentions): requests about stages that must be refused.
BAD_STAGE_REQUESTS: list[tuple[dict[str, Any], str, object, str]] = [
    (DEPLOY, "/debts/1", {"payment": "lint"}, "'lint' is not a stage of debt 1; its stages are: build, test, deploy"),
    (DEPLOY, "/debts/1?payment=lint", None, "not a stage"),
    ({"timeout": 60, "stages": []}, "/debts/1?payment=lint", None, "not a stage of debt 1; it declares no stages"),
    (DEPLOY, "/debts/1?payment=lint&payoff=true", None, "not a stage"),
    (DEPLOY, "/debts/1", {"payment": "a b"}, "payment"),
    (DEPLOY, "/debts/1", {"payment": ""}, "payment"),
    (DEPLOY, "/debts/1", {"payment": "x" * 65}, "payment"),
    (DEPLOY, "/debts/1", {"payment": 5}, "payment"),
    (DEPLOY, "/debts/1?payment=a%20b", None, "payment"),
    (DEPLOY, "/debts/1?payment=", None, "payment"),
    (DEPLOY, "/debts/1?payment=build", {"payment": "test"}, "different payments"),
    (DEPLOY, "/debts/1", {"payoff": "yes"}, "payoff"),
    (DEPLOY, "/debts/1", {"payoff": 1}, "payoff"),
    (DEPLOY, "/debts/1", {"payoff": None}, "payoff"),
    (DEPLOY, "/debts/1?payoff=maybe", None, "payoff"),
    (DEPLOY, "/debts/1?payoff=TRUE", None, "payoff"),
    (DEPLOY, "/debts/1?payoff=false", {"payoff": True}, "disagree"),
    (DEPLOY, "/debts/1?payof=true", None, "payof"),
    (DEPLOY, "/debts/1?payment=build&payment=test", None, "more than once: payment"),
    (DEPLOY, "/debts/1?payoff=true&payoff=false", None, "more than once: payoff"),
    (DEPLOY, "/debts/1", {"stages": ["ok", "not ok"]}, "stages"),
    (DEPLOY, "/debts/1", {"stages": ["a", "a"]}, "names each stage once"),
    (DEPLOY, "/debts/1", {"stages": [f"s{i}" for i in range(101)]}, "stages"),
    (DEPLOY, "/debts/1", {"interval": 60}, "at most one"),
    (DEPLOY, "/debts/1", {"timeout": None}, "`stages` are for multi-stage debts"),
    (DEPLOY, "/debts/1", {"timeout": "2y"}, "timeout"),
    ({"interval": 60}, "/debts/1?payment=build", None, "named payments are for multi-stage debts"),
    ({"interval": 60}, "/debts/1?payoff=true", None, "cannot be paid off"),
    ({"interval": 60}, "/debts/1", {"payment": "build", "payoff": True}, "not a multi-stage debt"),
    ({"interval": 60}, "/debts/1", {"stages": ["build"]}, "timeout"),
    ({}, "/debts/1?payoff=true", None, "cannot be paid off"),
    ({}, "/debts/1", {"payment": "build"}, "not a multi-stage debt"),
]


@pytest.mark.parametrize(("definition", "path", "body", "mentions"), BAD_STAGE_REQUESTS)
async def test_bad_stage_requests_are_400_and_change_nothing(
    client: Client, telemetry: RecordingTelemetry, definition: dict[str, Any], path: str, body: object, mentions: str
) -> None:
    debt = await create(client, definition)
    events = list(telemetry.events)
    status, answer, _ = await call(client, "POST", path, body)
    assert status == 400
    assert mentions in answer["error"]
    assert (await call(client, "GET", "/debts/1"))[1] == debt
    assert telemetry.events == events


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"timeout": 60, "stages": ["ok", "not ok"]}, "stages"),
        ({"timeout": 60, "stages": ["x" * 65]}, "stages"),
        ({"timeout": 60, "stages": [f"s{i}" for i in range(101)]}, "stages"),
        ({"timeout": 60, "stages": ["a", "b", "a"]}, "names each stage once"),
        ({"interval": 60, "stages": ["build"]}, "give the debt a `timeout`"),
        ({"interval": 60, "timeout": 60}, "at most one"),
    ],
)
async def test_bad_multi_stage_definitions_vivify_nothing(
    client: Client, telemetry: RecordingTelemetry, body: dict[str, Any], mentions: str
) -> None:
    status, answer, _ = await call(client, "POST", "/debts/5?payment=a", body)
    assert status == 400
    assert mentions in answer["error"]
    assert (await call(client, "GET", "/debts/5"))[0] == 404
    assert telemetry.events == []


async def test_a_hundred_distinct_stages_are_accepted(client: Client) -> None:
    stages = [f"s{i}" for i in range(100)]
    assert (await create(client, {"timeout": 60, "stages": stages}))["stages"] == stages


async def test_the_sweep_times_out_an_open_debt_at_its_deadline_and_clears_it(
    client: Client, clock: FakeClock, service: Service, telemetry: RecordingTelemetry
) -> None:
    await create(client, DEPLOY)
    await call(client, "POST", "/debts/1?payment=build")
    clock.advance(899.999999)
    assert await service.sweep() == 0
    clock.advance(0.000001)
    # Past the timeout but not yet swept: it reads timed_out, and a payment changes nothing.
    assert (await call(client, "GET", "/debts/1"))[1]["status"] == "timed_out"
    assert (await call(client, "POST", "/debts/1?payoff=true"))[0] == 404
    assert telemetry.kinds() == ["created", "paid"]
    assert await service.sweep() == 1
    timed_out = telemetry.events[-1]
    assert timed_out.kind is EventKind.TIMED_OUT
    assert timed_out.debt.missing_stages == ("test", "deploy")
    assert [payment.name for payment in timed_out.debt.paid] == ["build"]
    assert (await call(client, "GET", "/debts/1"))[0] == 404
    assert await service.sweep() == 0
    assert telemetry.kinds() == ["created", "paid", "timed_out"]


class SteppingClock(FakeClock):
    """A clock that moves on by a microsecond each time it is read, so concurrent calls straddle a deadline."""

    def __call__(self) -> datetime:
        self.now += timedelta(microseconds=1)
        return self.now


async def test_a_payoff_racing_the_timeout_has_exactly_one_outcome(store_url: str) -> None:
    store = store_from_url(store_url)
    clock, telemetry = SteppingClock(), RecordingTelemetry()
    service = Service(store, telemetry, clock)
    shuffle = random.Random(4).shuffle
    contenders = 8
    await store.open()
    try:
        for trial in range(2 * contenders + 2):
            debt = await service.create({"timeout": 10.0, "stages": ("build", "deploy")})
            assert debt.deadline is not None
            # Start `trial` clock reads before the deadline: early trials time out, late ones pay off.
            clock.now = debt.deadline - timedelta(microseconds=trial + 1)
            payoff = PaymentRequest({}, payment="deploy", payoff=True)
            calls = [service.pay(debt.id, payoff) for _ in range(contenders)]
            calls += [service.sweep() for _ in range(contenders)]
            shuffle(calls)
            results = await asyncio.gather(*calls, return_exceptions=True)
            failures = [result for result in results if isinstance(result, BaseException)]
            assert all(isinstance(failure, NotFound) for failure in failures), failures
            finals = [
                event.kind for event in telemetry.events if event.debt.id == debt.id and event.kind in FINAL_KINDS
            ]
            assert len(finals) == 1, (trial, finals)
            paid_offs = [result for result in results if isinstance(result, tuple)]
            assert len(paid_offs) == (1 if finals == [EventKind.PAID_OFF] else 0)
            assert await store.get(debt.id) is None
        outcomes = {event.kind for event in telemetry.events if event.kind in FINAL_KINDS}
        assert outcomes == FINAL_KINDS, "the trials should see both outcomes"
    finally:
        await store.close()


async def test_the_watcher_times_out_within_a_second_without_requests() -> None:
    telemetry = RecordingTelemetry()
    service = Service(MemoryStore(), telemetry)
    async with watching(service):
        debt = await service.create({"timeout": 0.3, "stages": ("build", "test")})
        await service.pay(debt.id, PaymentRequest({}, payment="build"))
        await wait_for_event(telemetry, EventKind.TIMED_OUT)
    timed_out = telemetry.events[-1]
    assert debt.deadline is not None
    assert timed_out.kind is EventKind.TIMED_OUT
    assert 0 <= (timed_out.at - debt.deadline).total_seconds() < 1
    assert timed_out.debt.missing_stages == ("test",)
    with pytest.raises(NotFound):
        await service.get(debt.id)


def test_a_real_deploy_pays_off_and_a_real_timeout_clears_without_requests() -> None:
    with start_compter() as compter, httpx.Client(base_url=compter.url, timeout=5) as http:
        opened = http.post("/debts", json=DEPLOY)
        assert opened.status_code == 201
        path = opened.headers["Location"]
        assert http.post(path, json={"payment": "build"}).json()["status"] == "open"
        assert http.post(f"{path}?payment=test").json()["status"] == "open"
        final = http.post(f"{path}?payment=deploy&payoff=true")
        assert (final.status_code, final.json()["status"], final.json()["payments"]) == (200, "paid_off", 3)
        assert [paid["name"] for paid in final.json()["paid"]] == ["build", "test", "deploy"]
        assert http.get(path).status_code == 404

        doomed = http.post("/debts", json={"timeout": 0.5, "stages": ["build", "deploy"]}).json()
        assert doomed["status"] == "open"
        time.sleep(0.5 + 1.5)  # the timeout, then the second SPEC allows, with a margin for a loaded machine
        gone = http.get(f"/debts/{doomed['id']}")
        assert gone.status_code == 404
        assert "does not exist" in gone.json()["error"]
