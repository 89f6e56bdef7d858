"""The use cases, shared by the API and the watcher: load, decide, save, report."""

from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol

from compter import model
from compter.errors import NotFound
from compter.model import Debt, Event, PaymentRequest, Status, TraceContext, Transition
from compter.store import Store

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Telemetry(Protocol):
    """What the service reports to; the OpenTelemetry implementation lives in compter.telemetry."""

    def record(self, events: Sequence[Event]) -> None: ...

    def new_trace(self, traceparent: str | None) -> TraceContext:
        """Ids for a new multi-stage debt's trace, joining the caller's trace if a traceparent is given."""

    def track(self, debts: Iterable[Debt] | None) -> None:
        """Report per-debt gauges for exactly these debts from now on (None: report none).

        The watcher's lease holder calls it with every debt of the store when it takes
        the lease and again every so often; `record` keeps the set current in between.
        """


class Service:
    def __init__(self, store: Store, telemetry: Telemetry, clock: Clock = utc_now) -> None:
        self.store = store
        self._telemetry = telemetry
        self._clock = clock
        self._due_listener: Callable[[datetime], None] = lambda due: None

    def on_due(self, listener: Callable[[datetime], None]) -> None:
        """Tell `listener` each time a debt gets a new due time, so the watcher can wake earlier."""
        self._due_listener = listener

    async def create(self, definition: Mapping[str, object], traceparent: str | None = None) -> Debt:
        now = self._clock()
        trace = self._trace_for(definition, traceparent)
        transition = await self.store.create(lambda debt_id: model.create(debt_id, definition, now, trace))
        return self._report(transition)

    async def pay(self, debt_id: int, request: PaymentRequest, traceparent: str | None = None) -> tuple[Debt, bool]:
        """Pay a debt; the flag says whether the payment vivified it."""
        now = self._clock()
        trace = self._trace_for(request.definition, traceparent)
        transition = await self.store.update(debt_id, lambda debt: model.pay(debt, debt_id, request, now, trace))
        vivified = any(event.kind is model.EventKind.VIVIFIED for event in transition.events)
        return self._report(transition), vivified

    async def get(self, debt_id: int) -> Debt:
        debt = await self.store.get(debt_id)
        if debt is None:
            raise NotFound(f"debt {debt_id} does not exist")
        return debt

    async def list_debts(self, *, status: Status | None = None, after: int = 0, limit: int | None = None) -> list[Debt]:
        if status is None:
            return await self.store.page(after=after, limit=limit)
        now = self._clock()
        found: list[Debt] = []
        async for page in self._pages(after, max(limit or 0, 500)):
            found.extend(debt for debt in page if debt.status(now) is status)
            if limit is not None and len(found) >= limit:
                break
        return found[:limit]

    async def all_debts(self, page_size: int = 1000) -> list[Debt]:
        """Every debt, read page by page so that no single store call is huge."""
        return [debt async for page in self._pages(0, page_size) for debt in page]

    def report_gauges(self, debts: Iterable[Debt] | None) -> None:
        """Report per-debt gauges for these debts (the watcher's lease holder), or none."""
        self._telemetry.track(debts)

    async def delete(self, debt_id: int) -> None:
        now = self._clock()
        self._report(await self.store.update(debt_id, lambda debt: model.delete(debt, debt_id, now)))

    async def sweep(self, limit: int = 100) -> int:
        """Act on every debt whose deadline has passed; how many changed."""
        now = self._clock()
        changed = 0
        for debt in await self.store.due(now, limit):
            transition = await self.store.update(debt.id, lambda current: model.act_on_deadline(current, now))
            if transition.changed:
                self._report(transition)
                changed += 1
        return changed

    async def _pages(self, after: int, page_size: int) -> AsyncIterator[list[Debt]]:
        while page := await self.store.page(after=after, limit=page_size):
            yield page
            if len(page) < page_size:
                return
            after = page[-1].id

    def now(self) -> datetime:
        return self._clock()

    def _trace_for(self, definition: Mapping[str, object], traceparent: str | None) -> TraceContext | None:
        if definition.get("timeout") is None:
            return None
        return self._telemetry.new_trace(traceparent)

    def _report(self, transition: Transition) -> Debt:
        if transition.changed:
            self._telemetry.record(transition.events)
            stored = transition.stored
            if stored is not None and stored.due is not None:
                self._due_listener(stored.due)
        answer = transition.answer if transition.answer is not None else transition.before
        assert answer is not None
        return answer
