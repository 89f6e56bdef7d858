"""Debts, deadlines, statuses and stages: the rules, with `now` passed in.

Every use case is a pure function from the debt as stored (or None) to a
`Transition`: the debt to answer with, the debt to store, and the events it
caused. Stores apply transitions atomically; telemetry turns events into signals.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from compter.errors import Invalid, NotFound

YEAR_S = 365 * 24 * 3600.0
MAX_ID = 2**63 - 1
MAX_NAME_LENGTH = 200
MAX_STAGES = 100
MAX_NAMED_PAYMENTS = 1000
STAGE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
DEFINITION_FIELDS = frozenset({"name", "interval", "grace", "timeout", "stages"})


class Status(enum.StrEnum):
    OK = "ok"
    OVERDUE = "overdue"
    OPEN = "open"
    PAID_OFF = "paid_off"
    TIMED_OUT = "timed_out"


FINAL_STATUSES = frozenset({Status.PAID_OFF, Status.TIMED_OUT})


class EventKind(enum.StrEnum):
    CREATED = "created"
    VIVIFIED = "vivified"
    PAID = "paid"
    OVERDUE = "overdue"
    RECOVERED = "recovered"
    PAID_OFF = "paid_off"
    TIMED_OUT = "timed_out"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class Payment:
    """A named payment of a multi-stage debt."""

    name: str
    at: datetime


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The W3C ids of a multi-stage debt's trace, kept with the debt (hex strings)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None = None
    sampled: bool = True


@dataclass(frozen=True, slots=True)
class Debt:
    id: int
    created: datetime
    updated: datetime
    name: str | None = None
    payments: int = 0
    interval: float | None = None
    grace: float = 0.0
    timeout: float | None = None
    stages: tuple[str, ...] | None = None
    paid: tuple[Payment, ...] = ()
    # True once the watcher has announced that the deadline passed; a payment clears it.
    overdue: bool = False
    trace: TraceContext | None = None
    # The status a cleared multi-stage debt ended with; None while it lives.
    final: Status | None = None

    @property
    def recurring(self) -> bool:
        return self.interval is not None

    @property
    def multi_stage(self) -> bool:
        return self.timeout is not None

    @property
    def deadline(self) -> datetime | None:
        if self.interval is not None:
            return self.updated + timedelta(seconds=self.interval + self.grace)
        if self.timeout is not None:
            return self.created + timedelta(seconds=self.timeout)
        return None

    @property
    def due(self) -> datetime | None:
        """When the watcher must next act on this debt; None when it never needs to."""
        if self.final is not None or (self.recurring and self.overdue):
            return None
        return self.deadline

    def status(self, now: datetime) -> Status:
        """The announced status, or what the watcher is about to announce once the deadline has passed."""
        deadline = self.deadline
        if self.final is None and deadline is not None and now >= deadline:
            return Status.OVERDUE if self.recurring else Status.TIMED_OUT
        return self.announced_status

    @property
    def announced_status(self) -> Status:
        """The status as the watcher last decided it, not the clock.

        A copy of the debt read a while ago (the gauges' in a fleet) cannot tell
        whether another process was paid since; this never reads overdue unless
        the watcher said so in the store.
        """
        if self.final is not None:
            return self.final
        if self.recurring:
            return Status.OVERDUE if self.overdue else Status.OK
        return Status.OPEN if self.multi_stage else Status.OK

    @property
    def missing_stages(self) -> tuple[str, ...]:
        paid = {payment.name for payment in self.paid}
        return tuple(stage for stage in self.stages or () if stage not in paid)


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a debt, for telemetry to report."""

    kind: EventKind
    debt: Debt
    at: datetime
    # For PAID: the stage named by the payment, and when the previous payment (or creation) was.
    payment: str | None = None
    since: datetime | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """The outcome of one use case on one debt.

    `answer` is what the client sees (the final state of a cleared debt included);
    `stored` is what the store keeps: None when the debt is gone. A transition
    whose `answer is before` changes nothing.
    """

    before: Debt | None
    answer: Debt | None
    events: tuple[Event, ...] = ()

    @property
    def changed(self) -> bool:
        return self.answer is not self.before

    @property
    def stored(self) -> Debt | None:
        if self.answer is None or self.answer.final is not None:
            return None
        return self.answer


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """What a POST /debts/{id} asks for, validated for types and ranges."""

    definition: Mapping[str, object]
    payment: str | None = None
    payoff: bool = False

    @property
    def defines(self) -> bool:
        """Whether it carries enough to re-create a lost debt."""
        return self.definition.get("interval") is not None or self.definition.get("timeout") is not None


def rfc3339(moment: datetime) -> str:
    """The contract's timestamp: UTC, microseconds, `Z`."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def unchanged(debt: Debt | None) -> Transition:
    return Transition(debt, debt)


def create(debt_id: int, definition: Mapping[str, object], now: datetime, trace: TraceContext | None) -> Transition:
    debt = _define(Debt(id=debt_id, created=now, updated=now), definition, trace)
    return Transition(None, debt, (Event(EventKind.CREATED, debt, now),))


def pay(
    current: Debt | None,
    debt_id: int,
    request: PaymentRequest,
    now: datetime,
    trace: TraceContext | None,
) -> Transition:
    """Apply a payment; an unknown id with a definition is vivified."""
    events: list[Event] = []
    live = current
    if current is not None and current.status(now) is Status.TIMED_OUT:
        # Its timeout passed before the watcher got to it: end it first, as the watcher would have.
        events.extend(time_out(current, now).events)
        live = None
    if live is None:
        if not request.defines:
            raise NotFound(
                f"debt {debt_id} does not exist; a payment that carries its `interval` "
                "(or `timeout`) would re-create it"
            )
        debt = _define(Debt(id=debt_id, created=now, updated=now), request.definition, trace)
        events.append(Event(EventKind.VIVIFIED, debt, now))
    else:
        debt = _define(live, request.definition, trace) if request.definition else live
    _check_payment(debt, request)
    was_overdue = live is not None and live.overdue
    since = debt.updated
    paid = debt.paid
    if request.payment is not None:
        paid = (*paid, Payment(request.payment, now))
    debt = dataclasses.replace(debt, payments=debt.payments + 1, updated=now, paid=paid, overdue=False)
    if request.payoff:
        debt = dataclasses.replace(debt, final=Status.PAID_OFF)
    events.append(Event(EventKind.PAID, debt, now, payment=request.payment, since=since))
    if was_overdue:
        events.append(Event(EventKind.RECOVERED, debt, now))
    if request.payoff:
        events.append(Event(EventKind.PAID_OFF, debt, now))
    return Transition(current, debt, tuple(events))


def mark_overdue(current: Debt | None, now: datetime) -> Transition:
    """Announce a passed deadline, only if the debt is still as the watcher saw it: due."""
    if current is None or not current.recurring or current.due is None or current.due > now:
        return unchanged(current)
    debt = dataclasses.replace(current, overdue=True)
    return Transition(current, debt, (Event(EventKind.OVERDUE, debt, now),))


def time_out(current: Debt | None, now: datetime) -> Transition:
    """End a multi-stage debt whose timeout passed, only if it is still open."""
    if current is None or not current.multi_stage or current.due is None or current.due > now:
        return unchanged(current)
    debt = dataclasses.replace(current, final=Status.TIMED_OUT)
    return Transition(current, debt, (Event(EventKind.TIMED_OUT, debt, now),))


def act_on_deadline(current: Debt | None, now: datetime) -> Transition:
    """What the watcher does to a debt that fell due."""
    if current is not None and current.multi_stage:
        return time_out(current, now)
    return mark_overdue(current, now)


def delete(current: Debt | None, debt_id: int, now: datetime) -> Transition:
    if current is None:
        raise NotFound(f"debt {debt_id} does not exist")
    return Transition(current, None, (Event(EventKind.DELETED, current, now),))


def _define(debt: Debt, changes: Mapping[str, object], trace: TraceContext | None) -> Debt:
    """Apply definition fields and check the result as a whole."""
    unknown = set(changes) - DEFINITION_FIELDS
    if unknown:
        raise Invalid(f"unknown definition field(s): {', '.join(sorted(unknown))}")
    debt = dataclasses.replace(debt, **changes)  # type: ignore[arg-type]
    if debt.interval is not None and debt.timeout is not None:
        raise Invalid("a debt has at most one of `interval` and `timeout`")
    if debt.stages is not None and not debt.multi_stage:
        raise Invalid("`stages` are for multi-stage debts: give the debt a `timeout` too")
    if debt.multi_stage and debt.trace is None:
        debt = dataclasses.replace(debt, trace=trace)
    if not debt.recurring and debt.overdue:
        debt = dataclasses.replace(debt, overdue=False)
    return debt


def _check_payment(debt: Debt, request: PaymentRequest) -> None:
    if not debt.multi_stage:
        if request.payoff:
            raise Invalid(f"debt {debt.id} is not a multi-stage debt (it has no `timeout`): it cannot be paid off")
        if request.payment is not None:
            raise Invalid(
                f"debt {debt.id} is not a multi-stage debt (it has no `timeout`): "
                "named payments are for multi-stage debts"
            )
        return
    if request.payment is None:
        return
    if debt.stages is not None and request.payment not in debt.stages:
        declared = f"its stages are: {', '.join(debt.stages)}" if debt.stages else "it declares no stages"
        raise Invalid(f"payment {request.payment!r} is not a stage of debt {debt.id}; {declared}")
    if len(debt.paid) >= MAX_NAMED_PAYMENTS:
        raise Invalid(f"debt {debt.id} already has {MAX_NAMED_PAYMENTS} named payments, the most it may have")
