"""The one interface every store implements; the service uses nothing else."""

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from compter.model import Debt, Transition

Decide = Callable[[Debt | None], Transition]
"""A pure function from the debt as stored (None: absent) to what should happen.

A store may call it more than once (optimistic retries), so it must not have
side effects; an exception it raises aborts the update with nothing written.
"""


class Store(Protocol):
    shared: bool
    """Whether several processes may use the same store at once (a fleet)."""

    async def open(self) -> None:
        """Connect and create or migrate the schema; StoreUnavailable if it cannot."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return if the store answers, raise StoreUnavailable if not."""

    async def get(self, debt_id: int) -> Debt | None: ...

    async def page(self, *, after: int = 0, limit: int | None = None) -> list[Debt]:
        """Debts with id > after, ordered by id, at most `limit` of them."""

    async def create(self, decide: Callable[[int], Transition]) -> Transition:
        """Store a new debt under a server-chosen id no existing debt has."""

    async def update(self, debt_id: int, decide: Decide) -> Transition:
        """Atomically read the debt, decide, and write `stored` (or delete it when None).

        Writes nothing when the transition has not changed anything. The write is
        durable (where the store is) before this returns.
        """

    async def due(self, now: datetime, limit: int) -> list[Debt]:
        """Debts whose `due` time is at or before now, earliest first, read from an index."""

    async def next_due(self) -> datetime | None:
        """The earliest `due` time of any debt, or None."""

    async def hold_lease(self, holder: str, ttl_s: float) -> bool:
        """Take or renew the watcher's lease for `ttl_s`; True while `holder` has it.

        One process of a fleet holds it at a time and watches deadlines for all;
        another takes over once the holder has stopped renewing it for `ttl_s`.
        """

    async def release_lease(self, holder: str) -> None:
        """Give the lease up if `holder` has it, so that another process takes over at once."""
