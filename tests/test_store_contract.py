"""The Store contract, one suite run against every store URL of tests/stores.py.

Run one backend with `-k memory`, `-k sqlite`, `-k postgresql` or `-k redis`.
"""

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest

from compter import model
from compter.errors import Invalid, StoreUnavailable
from compter.model import MAX_ID, Debt, EventKind, Payment, PaymentRequest, Status, TraceContext, Transition
from compter.service import Service
from compter.store import Store, store_from_url
from compter.watcher import Watcher
from tests.fakes import T0, FakeClock, RecordingTelemetry

SHARED_SCHEMES = {"postgresql", "redis"}


def later(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def recurring(debt_id: int, interval: float = 60.0, **fields: object) -> Debt:
    return dataclasses.replace(Debt(id=debt_id, created=T0, updated=T0, interval=interval), **fields)  # type: ignore[arg-type]


def multi_stage(debt_id: int, timeout: float = 60.0, **fields: object) -> Debt:
    return dataclasses.replace(Debt(id=debt_id, created=T0, updated=T0, timeout=timeout), **fields)  # type: ignore[arg-type]


async def put(store: Store, debt: Debt) -> None:
    """Store a debt as it is, under its own id (as a vivifying payment would)."""
    await store.update(debt.id, lambda before: Transition(before, debt))


async def opened(url: str) -> Store:
    store = store_from_url(url)
    await store.open()
    return store


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """The store under test, open; it replaces conftest's memory store, so `service` runs on it too."""
    store = await opened(store_url)
    yield store
    await store.close()


@pytest.fixture
async def stores(store: Store, store_url: str) -> AsyncIterator[list[Store]]:
    """The store, plus a second instance on the same URL when the store may be shared by a fleet."""
    if not store.shared:
        yield [store]
        return
    second = await opened(store_url)
    yield [store, second]
    await second.close()


# --- opening --------------------------------------------------------------------------------------


async def test_shared_only_for_stores_a_fleet_can_share(store: Store, store_url: str) -> None:
    assert store.shared is (store_url.split(":", 1)[0] in SHARED_SCHEMES)


async def test_ping_answers_when_open(store: Store) -> None:
    await store.ping()


async def test_opening_again_keeps_every_debt_and_migrates_idempotently(store: Store, store_url: str) -> None:
    if store_url.startswith("memory:"):
        pytest.skip("memory:// keeps nothing beyond its instance")
    debt = recurring(7, name="kept")
    await put(store, debt)
    again = await opened(store_url)
    try:
        assert await again.get(7) == debt
        assert [found.id for found in await again.due(later(61), 10)] == [7]
        created = await again.create(lambda debt_id: model.create(debt_id, {}, T0, None))
        assert created.answer is not None
        assert created.answer.id > 7
    finally:
        await again.close()
    third = await opened(store_url)
    try:
        assert [found.id for found in await third.page()] == [7, created.answer.id]
    finally:
        await third.close()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("sqlite:///nonexistent-dir/compter.db", id="sqlite"),
        pytest.param("postgresql://compter:s3cret-pw@127.0.0.1:1/compter", id="postgresql"),
        pytest.param("redis://:s3cret-pw@127.0.0.1:1/0", id="redis"),
    ],
)
async def test_open_fails_with_store_unavailable_that_hides_the_password(url: str) -> None:
    store = store_from_url(url)
    with pytest.raises(StoreUnavailable) as raised:
        await asyncio.wait_for(store.open(), timeout=15)
    assert "s3cret-pw" not in str(raised.value)


# --- create, get, page, update, delete ------------------------------------------------------------


async def test_create_get_page_update_delete(store: Store) -> None:
    ids = []
    for name in ["a", "b", "c"]:
        transition = await store.create(lambda debt_id, name=name: model.create(debt_id, {"name": name}, T0, None))
        assert transition.answer is not None
        assert transition.events[0].kind is EventKind.CREATED
        ids.append(transition.answer.id)
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    assert all(1 <= debt_id <= MAX_ID for debt_id in ids)
    assert [debt.name for debt in await store.page()] == ["a", "b", "c"]
    assert [debt.id for debt in await store.page(after=ids[0])] == ids[1:]
    assert [debt.id for debt in await store.page(limit=2)] == ids[:2]
    assert [debt.id for debt in await store.page(after=ids[0], limit=1)] == [ids[1]]
    assert await store.page(after=ids[2]) == []

    paid = await store.update(ids[1], lambda debt: model.pay(debt, ids[1], PaymentRequest({}), later(5), None))
    assert paid.answer is not None
    assert paid.answer.payments == 1
    assert await store.get(ids[1]) == paid.answer

    deleted = await store.update(ids[0], lambda debt: model.delete(debt, ids[0], later(6)))
    assert deleted.stored is None
    assert await store.get(ids[0]) is None
    assert [debt.id for debt in await store.page()] == ids[1:]
    assert await store.get(424242) is None


async def test_update_of_an_unknown_id_sees_none_and_may_create_it(store: Store) -> None:
    seen: list[Debt | None] = []

    def decide(before: Debt | None) -> Transition:
        seen.append(before)
        return model.pay(before, 99, PaymentRequest({"interval": 60.0}), T0, None)

    transition = await store.update(99, decide)
    assert seen[-1] is None
    assert [event.kind for event in transition.events] == [EventKind.VIVIFIED, EventKind.PAID]
    assert await store.get(99) == transition.answer


async def test_created_ids_continue_after_the_highest_stored_vivified_included(store: Store) -> None:
    await put(store, recurring(1000))
    first = await store.create(lambda debt_id: model.create(debt_id, {}, T0, None))
    assert first.answer is not None
    assert first.answer.id > 1000
    await put(store, recurring(first.answer.id + 1))
    second = await store.create(lambda debt_id: model.create(debt_id, {}, T0, None))
    assert second.answer is not None
    assert second.answer.id > first.answer.id + 1


async def test_created_ids_never_collide_with_vivified_ids_near_the_top(store: Store) -> None:
    await put(store, recurring(MAX_ID - 1))
    ids = {MAX_ID - 1}
    for _ in range(3):  # the top id, then wherever the store finds room
        transition = await store.create(lambda debt_id: model.create(debt_id, {}, T0, None))
        assert transition.answer is not None
        ids.add(transition.answer.id)
    assert len(ids) == 4
    assert all(1 <= debt_id <= MAX_ID for debt_id in ids)
    assert {debt.id for debt in await store.page()} == ids


# --- a debt round-trips exactly ---------------------------------------------------------------------


ROUND_TRIPS = [
    recurring(
        3,
        interval=90.5,
        name="nächtliche Sicherung ✓",
        updated=T0 + timedelta(seconds=12, microseconds=7),
        payments=41,
        grace=0.25,
        overdue=True,
    ),
    multi_stage(
        4,
        timeout=900.0,
        name="deploy",
        payments=2,
        stages=("build", "test", "ship"),
        paid=(Payment("build", later(1.000001)), Payment("test", later(2.5))),
        updated=later(2.5),
        trace=TraceContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "00f067aa0ba902b7", sampled=False),
    ),
    multi_stage(5, timeout=1.0, trace=TraceContext("1" * 32, "2" * 16)),
    Debt(id=MAX_ID, created=T0, updated=T0),
]


async def test_a_debt_round_trips_exactly(store: Store) -> None:
    for debt in ROUND_TRIPS:
        await put(store, debt)
    for debt in ROUND_TRIPS:
        got = await store.get(debt.id)
        assert got == debt
        assert got.created.utcoffset() == timedelta(0)
        assert got.updated.utcoffset() == timedelta(0)
        assert all(payment.at.utcoffset() == timedelta(0) for payment in got.paid)
    assert await store.page() == ROUND_TRIPS
    assert await store.due(later(10_000), 10) == [ROUND_TRIPS[2], ROUND_TRIPS[1]]


# --- the deadline index -----------------------------------------------------------------------------


async def test_due_and_next_due_in_deadline_order(store: Store) -> None:
    assert await store.next_due() is None
    assert await store.due(later(10_000), 10) == []
    await put(store, recurring(1, interval=30.0))
    await put(store, recurring(2, interval=10.0))
    await put(store, multi_stage(3, timeout=20.0))
    await put(store, Debt(id=4, created=T0, updated=T0))  # never due
    await put(store, recurring(5, interval=10.0, grace=25.0))
    assert await store.next_due() == later(10)
    assert await store.due(T0, 10) == []
    assert [debt.id for debt in await store.due(later(10), 10)] == [2]
    assert [debt.id for debt in await store.due(later(25), 10)] == [2, 3]
    assert [debt.id for debt in await store.due(later(1000), 10)] == [2, 3, 1, 5]
    assert [debt.id for debt in await store.due(later(1000), 2)] == [2, 3]


async def test_a_debt_leaves_the_index_when_overdue_paid_or_cleared(store: Store) -> None:
    await put(store, recurring(1, interval=10.0))
    await put(store, multi_stage(2, timeout=20.0, stages=("a",)))
    await put(store, multi_stage(3, timeout=30.0))
    await put(store, recurring(4, interval=40.0))

    flipped = await store.update(1, lambda debt: model.act_on_deadline(debt, later(11)))
    assert flipped.answer is not None
    assert flipped.answer.overdue
    assert [debt.id for debt in await store.due(later(11), 10)] == []
    assert await store.next_due() == later(20)

    await store.update(1, lambda debt: model.pay(debt, 1, PaymentRequest({}), later(12), None))
    assert await store.next_due() == later(20)
    assert [debt.id for debt in await store.due(later(22), 10)] == [2, 1]  # due again at 12 + 10

    timed_out = await store.update(2, lambda debt: model.act_on_deadline(debt, later(22)))
    assert timed_out.answer is not None
    assert timed_out.answer.final is Status.TIMED_OUT
    assert await store.get(2) is None
    payoff = PaymentRequest({}, payoff=True)
    await store.update(3, lambda debt: model.pay(debt, 3, payoff, later(23), None))
    assert await store.get(3) is None
    await store.update(4, lambda debt: model.delete(debt, 4, later(24)))
    assert [debt.id for debt in await store.due(later(1000), 10)] == [1]
    assert await store.next_due() == later(22)


async def test_the_watcher_flips_a_due_debt_once(store: Store) -> None:
    await put(store, recurring(1, interval=10.0))
    first = await store.update(1, lambda debt: model.act_on_deadline(debt, later(11)))
    second = await store.update(1, lambda debt: model.act_on_deadline(debt, later(11)))
    assert [event.kind for event in first.events] == [EventKind.OVERDUE]
    assert not second.changed
    assert second.events == ()


# --- atomicity: nothing written unless decided -----------------------------------------------------


async def test_decide_raising_writes_nothing(store: Store) -> None:
    debt = recurring(1, payments=3)
    await put(store, debt)

    def refuse(before: Debt | None) -> Transition:
        raise Invalid("no")

    with pytest.raises(Invalid):
        await store.update(1, refuse)
    with pytest.raises(Invalid):
        await store.update(2, refuse)
    with pytest.raises(Invalid):
        await store.create(lambda debt_id: model.create(debt_id, {"interval": 1.0, "timeout": 1.0}, T0, None))
    assert await store.page() == [debt]
    assert await store.due(later(1000), 10) == [debt]


async def test_an_unchanged_transition_writes_nothing(store: Store) -> None:
    debt = recurring(1, payments=3)
    await put(store, debt)

    def pretend(before: Debt | None) -> Transition:
        assert before is not None
        # Not the stored debt, but answered as `before`: the transition says nothing changed.
        altered = dataclasses.replace(before, payments=99, interval=1.0)
        return Transition(altered, altered)

    assert not (await store.update(1, pretend)).changed
    assert not (await store.update(2, model.unchanged)).changed
    assert await store.page() == [debt]
    assert await store.next_due() == debt.due


# --- the watcher's lease ----------------------------------------------------------------------------


async def test_a_store_of_one_process_always_grants_the_lease(store: Store) -> None:
    if store.shared:
        pytest.skip("a shared store grants the lease to one holder at a time")
    assert await store.hold_lease("a", 1.0)
    assert await store.hold_lease("b", 1.0)


async def test_one_holder_at_a_time_and_a_takeover_after_the_ttl(stores: list[Store]) -> None:
    if len(stores) == 1:
        pytest.skip("a store of one process has no one to share the lease with")
    first, second = stores
    ttl_s = 2.0
    assert await first.hold_lease("first", ttl_s)
    assert not await second.hold_lease("second", ttl_s)
    for _ in range(3):  # renewing keeps it past the ttl
        await asyncio.sleep(ttl_s / 2)
        assert await first.hold_lease("first", ttl_s)
        assert not await second.hold_lease("second", ttl_s)
    await asyncio.sleep(ttl_s + 0.6)  # the holder stopped renewing
    assert await second.hold_lease("second", ttl_s)
    assert not await first.hold_lease("first", ttl_s)
    assert await second.hold_lease("second", ttl_s)


async def test_a_released_lease_is_taken_at_once_and_only_its_holder_releases_it(stores: list[Store]) -> None:
    if len(stores) == 1:
        pytest.skip("a store of one process has no one to share the lease with")
    first, second = stores
    assert await first.hold_lease("first", 60)
    await second.release_lease("second")  # not the holder: changes nothing
    assert not await second.hold_lease("second", 60)
    await first.release_lease("first")
    assert await second.hold_lease("second", 60)
    assert not await first.hold_lease("first", 60)
    await second.release_lease("second")


async def test_a_watcher_stops_at_any_moment(store: Store) -> None:
    """Even inside a store call: a driver that loses the cancellation must not keep it running."""
    for _ in range(40):
        watcher = Watcher(Service(store, RecordingTelemetry()), poll_s=0.005)
        watcher.start()
        await asyncio.sleep(random.uniform(0, 0.03))
        async with asyncio.timeout(3):
            await watcher.stop()


# --- concurrency, through the service ----------------------------------------------------------------


def services(stores: list[Store], clock: FakeClock) -> tuple[list[Service], RecordingTelemetry]:
    telemetry = RecordingTelemetry()
    return [Service(store, telemetry, clock) for store in stores], telemetry


async def test_concurrent_payments_each_count_once(stores: list[Store], clock: FakeClock) -> None:
    clients, payments_each = 64, 200
    (first, *rest), telemetry = services(stores, clock)
    debt = await first.create({"name": "busy", "interval": 3600})
    every = [first, *rest]

    async def client(n: int) -> None:
        service = every[n % len(every)]
        for _ in range(payments_each):
            await service.pay(debt.id, PaymentRequest({}))

    await asyncio.gather(*(client(n) for n in range(clients)))
    stored = await first.get(debt.id)
    assert stored.payments == clients * payments_each
    assert telemetry.kinds().count("paid") == clients * payments_each


async def test_concurrent_vivifications_create_the_debt_once(stores: list[Store], clock: FakeClock) -> None:
    clients, debt_id = 64, 4242
    every, telemetry = services(stores, clock)
    request = PaymentRequest({"name": "vivid", "interval": 60.0})

    async def client(n: int) -> bool:
        _, vivified = await every[n % len(every)].pay(debt_id, request)
        return vivified

    vivified = await asyncio.gather(*(client(n) for n in range(clients)))
    assert vivified.count(True) == 1
    assert telemetry.kinds().count("vivified") == 1
    stored = await every[0].get(debt_id)
    assert (stored.payments, stored.name) == (clients, "vivid")


async def test_concurrent_creates_get_distinct_ids(stores: list[Store], clock: FakeClock) -> None:
    every, _ = services(stores, clock)
    created = await asyncio.gather(*(every[n % len(every)].create({"name": f"d{n}"}) for n in range(64)))
    assert len({debt.id for debt in created}) == 64
    assert sorted(debt.id for debt in await stores[0].page()) == sorted(debt.id for debt in created)


async def test_service_reads_what_it_wrote(service: Service, store: Store, clock: FakeClock) -> None:
    """The conftest service, on this store: create, pay, list by status, sweep, delete."""
    debt = await service.create({"name": "nightly", "interval": 10})
    clock.advance(11)
    assert await service.sweep() == 1
    assert [found.id for found in await service.list_debts(status=Status.OVERDUE)] == [debt.id]
    paid, vivified = await service.pay(debt.id, PaymentRequest({}))
    assert (paid.payments, paid.status(clock()), vivified) == (1, Status.OK, False)
    await service.delete(debt.id)
    assert await store.page() == []
