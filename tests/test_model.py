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


def deploy(**fields: object) -> Debt:
    """An open multi-stage debt with three declared stages, created at T0."""
    return debt(timeout=900, stages=("build", "test", "deploy"), **fields)


def paid_names(transition: model.Transition) -> list[str]:
    assert transition.answer is not None
    return [payment.name for payment in transition.answer.paid]


def test_named_payment_is_appended_and_the_debt_stays_open() -> None:
    later = T0 + 30 * SECOND
    before = deploy(paid=(model.Payment("build", T0 + 10 * SECOND),), payments=1, updated=T0 + 10 * SECOND)
    transition = model.pay(before, 1, PaymentRequest({}, payment="test"), later, None)
    paid = transition.answer
    assert paid is not None
    assert paid.paid == (model.Payment("build", T0 + 10 * SECOND), model.Payment("test", later))
    assert (paid.payments, paid.updated, paid.status(later), paid.deadline) == (
        2,
        later,
        Status.OPEN,
        T0 + 900 * SECOND,
    )
    assert transition.stored == paid
    assert kinds(transition) == [EventKind.PAID]
    assert (transition.events[0].payment, transition.events[0].since) == ("test", T0 + 10 * SECOND)


@pytest.mark.parametrize("payment", [None, "deploy"])
def test_payoff_answers_the_final_state_and_clears_the_debt(payment: str | None) -> None:
    later = T0 + 60 * SECOND
    transition = model.pay(deploy(), 1, PaymentRequest({}, payment=payment, payoff=True), later, None)
    final = transition.answer
    assert final is not None
    assert (final.final, final.status(later), final.payments, final.updated) == (
        Status.PAID_OFF,
        Status.PAID_OFF,
        1,
        later,
    )
    assert [p.name for p in final.paid] == ([payment] if payment else [])
    assert transition.stored is None
    assert kinds(transition) == [EventKind.PAID, EventKind.PAID_OFF]
    assert transition.events[0].payment == payment
    assert final.due is None


@pytest.mark.parametrize(
    ("names", "missing"),
    [
        (["build", "test", "deploy"], ()),
        (["build", "build", "test"], ("deploy",)),  # a retried stage is paid again
        (["test", "build"], ("deploy",)),  # out of order: parallel or reordered steps
        (["deploy"], ("build", "test")),  # optional steps skipped
    ],
)
def test_stages_may_repeat_and_come_in_any_order(names: list[str], missing: tuple[str, ...]) -> None:
    current = deploy()
    for second, name in enumerate(names, start=1):
        transition = model.pay(current, 1, PaymentRequest({}, payment=name), T0 + second * SECOND, None)
        assert transition.answer is not None
        current = transition.answer
    assert [payment.name for payment in current.paid] == names
    assert [payment.at for payment in current.paid] == [T0 + n * SECOND for n in range(1, len(names) + 1)]
    assert current.missing_stages == missing


def test_without_declared_stages_any_stage_name_is_accepted() -> None:
    transition = model.pay(debt(timeout=60), 1, PaymentRequest({}, payment="anything.at:all-1"), T0, None)
    assert paid_names(transition) == ["anything.at:all-1"]


@pytest.mark.parametrize(
    ("the_debt", "request_", "message"),
    [
        (deploy(), PaymentRequest({}, payment="lint"), "'lint' is not a stage of debt 1; its stages are: build, test"),
        (deploy(), PaymentRequest({}, payment="lint", payoff=True), "not a stage"),
        (debt(), PaymentRequest({}, payoff=True), "cannot be paid off"),
        (deploy(), PaymentRequest({"timeout": None}), "`stages` are for multi-stage debts"),
        (deploy(), PaymentRequest({"interval": 60.0, "timeout": None, "stages": None}, payment="build"), "named"),
        (deploy(), PaymentRequest({"interval": 60.0}), "at most one"),
        (debt(timeout=60, stages=()), PaymentRequest({}, payment="build"), "not a stage"),
        (
            debt(timeout=60, paid=(model.Payment("x", T0),) * model.MAX_NAMED_PAYMENTS),
            PaymentRequest({}, payment="x"),
            "1000 named payments",
        ),
    ],
)
def test_multi_stage_payment_rules(the_debt: Debt, request_: PaymentRequest, message: str) -> None:
    with pytest.raises(Invalid, match=message):
        model.pay(the_debt, 1, request_, T0, None)


def test_stages_need_a_timeout() -> None:
    with pytest.raises(Invalid, match="give the debt a `timeout`"):
        model.create(1, {"stages": ("a",)}, T0, None)


def test_payment_with_a_timeout_vivifies_a_lost_multi_stage_debt() -> None:
    trace = model.TraceContext("c" * 32, "d" * 16)
    definition = {"name": "deploy", "timeout": 900.0, "stages": ("build", "test")}
    transition = model.pay(None, 42, PaymentRequest(definition, payment="build"), T0, trace)
    assert transition.answer == Debt(
        id=42,
        created=T0,
        updated=T0,
        name="deploy",
        payments=1,
        timeout=900.0,
        stages=("build", "test"),
        paid=(model.Payment("build", T0),),
        trace=trace,
    )
    assert kinds(transition) == [EventKind.VIVIFIED, EventKind.PAID]
    with pytest.raises(Invalid, match="not a stage"):
        model.pay(None, 42, PaymentRequest(definition, payment="lint"), T0, trace)


def test_vivifying_payoff_answers_paid_off_and_keeps_nothing() -> None:
    transition = model.pay(None, 42, PaymentRequest({"timeout": 60.0}, payoff=True), T0, None)
    assert transition.answer is not None
    assert transition.answer.final is Status.PAID_OFF
    assert transition.stored is None
    assert kinds(transition) == [EventKind.VIVIFIED, EventKind.PAID, EventKind.PAID_OFF]


def test_payment_after_the_timeout_but_before_the_watcher_times_it_out_first() -> None:
    late = T0 + 900 * SECOND
    with pytest.raises(NotFound, match="would re-create it"):
        model.pay(deploy(), 1, PaymentRequest({}, payment="build", payoff=True), late, None)
    transition = model.pay(deploy(), 1, PaymentRequest({"timeout": 900.0}, payment="build"), late, None)
    assert kinds(transition) == [EventKind.TIMED_OUT, EventKind.VIVIFIED, EventKind.PAID]
    assert transition.events[0].debt.missing_stages == ("build", "test", "deploy")
    assert transition.answer is not None
    assert (transition.answer.created, transition.answer.stages, paid_names(transition)) == (late, None, ["build"])


@pytest.mark.parametrize(
    ("the_debt", "kind"),
    [
        (deploy(), EventKind.TIMED_OUT),
        (debt(interval=900), EventKind.OVERDUE),
    ],
)
def test_act_on_deadline_times_out_multi_stage_debts_and_flips_recurring_ones(the_debt: Debt, kind: EventKind) -> None:
    assert not model.act_on_deadline(the_debt, T0 + 899 * SECOND).changed
    assert kinds(model.act_on_deadline(the_debt, T0 + 900 * SECOND)) == [kind]
    assert not model.act_on_deadline(None, T0 + 900 * SECOND).changed
    assert not model.act_on_deadline(debt(), T0 + 10**6 * SECOND).changed


def test_payoff_and_timeout_exclude_each_other() -> None:
    """Whichever the store applies first wins; the other sees the debt gone and does nothing."""
    at_deadline = T0 + 900 * SECOND
    paid_off = model.pay(deploy(), 1, PaymentRequest({}, payoff=True), at_deadline - SECOND, None)
    assert not model.time_out(paid_off.stored, at_deadline).changed
    timed_out = model.time_out(deploy(), at_deadline)
    with pytest.raises(NotFound):
        model.pay(timed_out.stored, 1, PaymentRequest({}, payoff=True), at_deadline, None)


def test_a_payment_changing_the_timeout_moves_the_deadline_from_created() -> None:
    later = T0 + 60 * SECOND
    longer = model.pay(deploy(), 1, PaymentRequest({"timeout": 1800.0}), later, None).answer
    assert longer is not None
    assert (longer.deadline, longer.status(later)) == (T0 + 1800 * SECOND, Status.OPEN)
    shorter = model.pay(deploy(), 1, PaymentRequest({"timeout": 30.0}), later, None)
    assert shorter.stored is not None
    assert shorter.stored.due == T0 + 30 * SECOND  # already passed: the watcher's next sweep times it out
    assert kinds(model.act_on_deadline(shorter.stored, later)) == [EventKind.TIMED_OUT]


def test_grace_does_not_extend_a_timeout() -> None:
    assert debt(timeout=60, grace=30).deadline == T0 + 60 * SECOND
