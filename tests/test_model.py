"""The domain rules, with time passed in."""

import dataclasses
from datetime import timedelta

import pytest

from compter import model
from compter.errors import Invalid, NotFound
from compter.model import Debt, EventKind, PaymentRequest, Status
from tests.fakes import T0

SECOND = timedelta(seconds=1)


def debt(**fields: object) -> Debt:
    return dataclasses.replace(Debt(id=1, created=T0, updated=T0), **fields)  # type: ignore[arg-type]


def kinds(transition: model.Transition) -> list[EventKind]:
    return [event.kind for event in transition.events]


@pytest.mark.parametrize(
    ("the_debt", "seconds_later", "status", "deadline"),
    [
        (debt(), 10**6, Status.OK, None),
        (debt(interval=60), 59, Status.OK, T0 + 60 * SECOND),
        (debt(interval=60), 60, Status.OVERDUE, T0 + 60 * SECOND),
        (debt(interval=60, grace=30), 89, Status.OK, T0 + 90 * SECOND),
        (debt(interval=60, grace=30), 90, Status.OVERDUE, T0 + 90 * SECOND),
        (debt(interval=60, updated=T0 + 100 * SECOND), 159, Status.OK, T0 + 160 * SECOND),
        (debt(interval=60, overdue=True), 1, Status.OVERDUE, T0 + 60 * SECOND),
        (debt(timeout=900), 899, Status.OPEN, T0 + 900 * SECOND),
        (debt(timeout=900, updated=T0 + 800 * SECOND), 900, Status.TIMED_OUT, T0 + 900 * SECOND),
        (debt(timeout=900, final=Status.PAID_OFF), 1, Status.PAID_OFF, T0 + 900 * SECOND),
    ],
)
def test_status_and_deadline(the_debt: Debt, seconds_later: float, status: Status, deadline: object) -> None:
    assert the_debt.status(T0 + seconds_later * SECOND) is status
    assert the_debt.deadline == deadline


@pytest.mark.parametrize(
    ("the_debt", "due"),
    [
        (debt(), None),
        (debt(interval=60), T0 + 60 * SECOND),
        (debt(interval=60, overdue=True), None),
        (debt(timeout=10), T0 + 10 * SECOND),
        (debt(timeout=10, final=Status.PAID_OFF), None),
    ],
)
def test_due_is_when_the_watcher_must_act(the_debt: Debt, due: object) -> None:
    assert the_debt.due == due


def test_create_sets_definition_and_reports_it() -> None:
    transition = model.create(7, {"name": "backup", "interval": 60.0}, T0, None)
    assert transition.answer == Debt(id=7, created=T0, updated=T0, name="backup", interval=60.0)
    assert kinds(transition) == [EventKind.CREATED]
    assert transition.stored == transition.answer


def test_create_gives_a_multi_stage_debt_its_trace() -> None:
    trace = model.TraceContext("a" * 32, "b" * 16)
    created = model.create(1, {"timeout": 60.0}, T0, trace).answer
    assert created is not None
    assert created.trace == trace
    assert model.create(2, {"interval": 60.0}, T0, trace).answer.trace is None  # type: ignore[union-attr]


def test_create_refuses_both_interval_and_timeout() -> None:
    with pytest.raises(Invalid, match="at most one"):
        model.create(1, {"interval": 60.0, "timeout": 60.0}, T0, None)


def test_payment_counts_and_moves_the_deadline() -> None:
    later = T0 + 30 * SECOND
    transition = model.pay(debt(interval=60), 1, PaymentRequest({}), later, None)
    paid = transition.answer
    assert paid is not None
    assert (paid.payments, paid.updated, paid.deadline) == (1, later, later + 60 * SECOND)
    assert kinds(transition) == [EventKind.PAID]
    assert transition.events[0].since == T0


def test_payment_after_announced_overdue_is_a_recovery() -> None:
    later = T0 + 100 * SECOND
    transition = model.pay(debt(interval=60, overdue=True), 1, PaymentRequest({}), later, None)
    assert transition.answer is not None
    assert transition.answer.status(later) is Status.OK
    assert not transition.answer.overdue
    assert kinds(transition) == [EventKind.PAID, EventKind.RECOVERED]


def test_payment_replaces_definition_fields_it_carries() -> None:
    transition = model.pay(debt(interval=60, name="a"), 1, PaymentRequest({"interval": 120.0, "grace": 5.0}), T0, None)
    assert transition.answer is not None
    assert (transition.answer.name, transition.answer.interval, transition.answer.grace) == ("a", 120.0, 5.0)


def test_payment_may_not_leave_both_interval_and_timeout() -> None:
    with pytest.raises(Invalid, match="at most one"):
        model.pay(debt(interval=60), 1, PaymentRequest({"timeout": 60.0}), T0, None)


def test_payment_to_unknown_id_with_a_definition_vivifies() -> None:
    transition = model.pay(None, 42, PaymentRequest({"interval": 3600.0, "name": "n"}), T0, None)
    assert transition.answer == Debt(id=42, created=T0, updated=T0, name="n", interval=3600.0, payments=1)
    assert kinds(transition) == [EventKind.VIVIFIED, EventKind.PAID]


@pytest.mark.parametrize("definition", [{}, {"name": "n"}, {"interval": None}, {"grace": 5.0}])
def test_payment_to_unknown_id_without_a_definition_is_not_found(definition: dict[str, object]) -> None:
    with pytest.raises(NotFound, match="would re-create it"):
        model.pay(None, 42, PaymentRequest(definition), T0, None)


@pytest.mark.parametrize(
    ("the_debt", "request_", "message"),
    [
        (debt(interval=60), PaymentRequest({}, payment="x"), "not a multi-stage debt"),
        (debt(interval=60), PaymentRequest({}, payoff=True), "cannot be paid off"),
        (debt(), PaymentRequest({}, payment="x"), "not a multi-stage debt"),
        (debt(timeout=60, stages=("a", "b")), PaymentRequest({}, payment="c"), "not a stage"),
    ],
)
def test_payment_rules(the_debt: Debt, request_: PaymentRequest, message: str) -> None:
    with pytest.raises(Invalid, match=message):
        model.pay(the_debt, 1, request_, T0, None)


def test_mark_overdue_is_conditional_on_the_debt_still_being_due() -> None:
    at_deadline = T0 + 60 * SECOND
    due = debt(interval=60)
    flipped = model.mark_overdue(due, at_deadline)
    assert flipped.changed
    assert kinds(flipped) == [EventKind.OVERDUE]
    assert flipped.answer is not None
    assert flipped.answer.overdue
    # Seen due, but meanwhile paid, announced already, or deleted: nothing happens.
    assert not model.mark_overdue(dataclasses.replace(due, updated=T0 + 30 * SECOND), at_deadline).changed
    assert not model.mark_overdue(flipped.answer, at_deadline + SECOND).changed
    assert not model.mark_overdue(None, at_deadline).changed
    assert not model.mark_overdue(due, at_deadline - SECOND).changed


def test_time_out_clears_an_open_multi_stage_debt_once() -> None:
    open_debt = debt(timeout=10, stages=("a", "b"), paid=(model.Payment("a", T0),))
    timed_out = model.time_out(open_debt, T0 + 10 * SECOND)
    assert kinds(timed_out) == [EventKind.TIMED_OUT]
    assert timed_out.answer is not None
    assert timed_out.answer.status(T0) is Status.TIMED_OUT
    assert timed_out.answer.missing_stages == ("b",)
    assert timed_out.stored is None
    assert not model.time_out(open_debt, T0 + 9 * SECOND).changed
    assert not model.time_out(None, T0 + 10 * SECOND).changed


def test_delete_reports_the_deleted_debt() -> None:
    transition = model.delete(debt(), 1, T0)
    assert transition.stored is None
    assert kinds(transition) == [EventKind.DELETED]
    with pytest.raises(NotFound):
        model.delete(None, 1, T0)
