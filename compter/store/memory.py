"""The default store: a dict and a heap of due times, in this process only."""

import heapq
from collections.abc import Callable
from datetime import datetime

from compter.model import MAX_ID, Debt, Transition
from compter.store.base import Decide


class MemoryStore:
    shared = False

    def __init__(self, url: str = "memory://") -> None:
        if url.lower() != "memory://":
            raise ValueError(f"the memory store takes nothing after memory://, not {url!r}")
        self._debts: dict[int, Debt] = {}
        # (due, id) pairs; an entry whose debt no longer has that due time is stale and skipped.
        self._due: list[tuple[datetime, int]] = []
        self._highest_id = 0

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def get(self, debt_id: int) -> Debt | None:
        return self._debts.get(debt_id)

    async def page(self, *, after: int = 0, limit: int | None = None) -> list[Debt]:
        ids = sorted(debt_id for debt_id in self._debts if debt_id > after)
        return [self._debts[debt_id] for debt_id in ids[:limit]]

    async def create(self, decide: Callable[[int], Transition]) -> Transition:
        debt_id = self._highest_id + 1
        while debt_id in self._debts:
            debt_id += 1
        if debt_id > MAX_ID:
            debt_id = next(i for i in range(1, MAX_ID) if i not in self._debts)
        transition = decide(debt_id)
        self._write(debt_id, transition)
        return transition

    async def update(self, debt_id: int, decide: Decide) -> Transition:
        transition = decide(self._debts.get(debt_id))
        if transition.changed:
            self._write(debt_id, transition)
        return transition

    async def due(self, now: datetime, limit: int) -> list[Debt]:
        self._drop_stale()
        found: dict[int, Debt] = {}
        for due, debt_id in heapq.nsmallest(limit, self._due):
            debt = self._debts.get(debt_id)
            if due <= now and debt is not None and debt.due == due:
                found[debt_id] = debt
        return list(found.values())

    async def next_due(self) -> datetime | None:
        self._drop_stale()
        return self._due[0][0] if self._due else None

    async def hold_lease(self, holder: str, ttl_s: float) -> bool:
        return True

    async def release_lease(self, holder: str) -> None:
        pass

    def _write(self, debt_id: int, transition: Transition) -> None:
        stored = transition.stored
        if stored is None:
            self._debts.pop(debt_id, None)
            return
        self._debts[debt_id] = stored
        self._highest_id = max(self._highest_id, debt_id)
        if stored.due is not None and (transition.before is None or transition.before.due != stored.due):
            heapq.heappush(self._due, (stored.due, debt_id))
            if len(self._due) > 2 * len(self._debts) + 1024:
                self._rebuild_heap()

    def _drop_stale(self) -> None:
        while self._due:
            due, debt_id = self._due[0]
            debt = self._debts.get(debt_id)
            if debt is not None and debt.due == due:
                return
            heapq.heappop(self._due)

    def _rebuild_heap(self) -> None:
        self._due = [(debt.due, debt.id) for debt in self._debts.values() if debt.due is not None]
        heapq.heapify(self._due)
