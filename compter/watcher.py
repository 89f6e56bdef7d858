"""The deadline loop: sleeps until the earliest due time, then lets the service act.

In a fleet sharing one store, only the process holding the store's lease watches
deadlines and reports the fleet-wide gauges; the others stand by and take over
within `lease_ttl_s` + `poll_s` when the holder stops renewing it.
"""

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from datetime import datetime

from compter.errors import StoreUnavailable
from compter.service import Service

log = logging.getLogger(__name__)

LEASE_TTL_S = 3.0
# How often a shared store is polled for due times set by other processes and the lease renewed.
POLL_S = 0.5
# How often the lease holder of a shared store reloads every debt for the gauges.
GAUGE_REFRESH_S = 5.0
# How often a store outage is logged, and how long the lease may take to be given back at shutdown.
OUTAGE_LOG_S = 60.0
RELEASE_TIMEOUT_S = 2.0


def holder_name() -> str:
    """Who holds the lease, as an operator reading the store would want to know."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Watcher:
    """Acts on passed deadlines within `poll_s` plus the time a sweep takes.

    It sleeps until the earliest due time the store reports, and is woken early
    when this process gives a debt an earlier one. On a shared store it sleeps at
    most `poll_s`, so that due times written by other processes are seen too.
    """

    def __init__(
        self,
        service: Service,
        *,
        holder: str | None = None,
        lease_ttl_s: float = LEASE_TTL_S,
        poll_s: float = POLL_S,
        gauge_refresh_s: float = GAUGE_REFRESH_S,
        batch: int = 100,
    ) -> None:
        self._service = service
        self._shared = service.store.shared
        self._holder = holder or holder_name()
        self._lease_ttl_s = lease_ttl_s
        self._poll_s = poll_s
        self._gauge_refresh_s = gauge_refresh_s
        self._batch = batch
        self._holding = False
        self._gauges_loaded_at = -float("inf")
        self._wake = asyncio.Event()
        self._wake_at: datetime | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        service.on_due(self._consider)

    @property
    def holding(self) -> bool:
        """Whether this process watches the deadlines (and reports the gauges) of the store."""
        return self._holding

    def start(self) -> None:
        """Watch in the background until `stop`."""
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Ask the loop to end as well as cancelling it: a library may swallow the cancellation.

        redis-py's writes go through Python 3.11's asyncio.wait_for, which loses a cancellation
        that arrives as the write completes; the loop then ends at its next step instead.
        """
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})  # not `await self._task`, which would swallow our own cancellation

    async def _run(self) -> None:
        failing_since: float | None = None
        warned_at = -float("inf")
        try:
            while not self._stopping:
                # Cleared before the sweep, so a due time given while it runs still wakes the next sleep.
                self._wake.clear()
                self._wake_at = None
                try:
                    next_due = await self._watch_once()
                except StoreUnavailable as error:
                    # Once a minute while the store stays away: requests already answer 503 with the reason.
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - warned_at >= OUTAGE_LOG_S:
                        warned_at = time.monotonic()
                        log.warning("watcher: %s; retrying every second", error)
                    await asyncio.sleep(1)
                    continue
                except Exception:
                    log.exception("watcher: unexpected error; retrying in 1 s")
                    await asyncio.sleep(1)
                    continue
                if failing_since is not None:
                    log.info("watcher: the store answers again after %.0f s", time.monotonic() - failing_since)
                    failing_since, warned_at = None, -float("inf")
                await self._sleep_until(next_due)
        finally:
            # The gauges stay reported, for the flush at exit to carry; a new holder reports them from here on.
            if self._holding and self._shared:
                await self._release()

    async def _release(self) -> None:
        """Hand the lease over on the way out, so another process watches at once rather than after its ttl."""
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                await self._service.store.release_lease(self._holder)
        except (StoreUnavailable, TimeoutError) as error:
            log.warning(
                "watcher: could not release the lease (%s); another process takes it within %.0f s",
                error or "timed out",
                self._lease_ttl_s,
            )
        else:
            log.info("watcher: released the store's lease")
        self._holding = False

    async def _watch_once(self) -> datetime | None:
        """Renew the lease, act on what is due; the next due time, if this process watches."""
        holding = await self._service.store.hold_lease(self._holder, self._lease_ttl_s)
        if holding != self._holding:
            self._holding = holding
            log.info("watcher: %s the store's lease as %s", "took" if holding else "lost", self._holder)
            if not holding:
                self._service.report_gauges(None)
                self._gauges_loaded_at = -float("inf")
        if not holding:
            return None
        if time.monotonic() - self._gauges_loaded_at >= (self._gauge_refresh_s if self._shared else float("inf")):
            self._service.report_gauges(await self._service.all_debts())
            self._gauges_loaded_at = time.monotonic()
        while await self._service.sweep(self._batch) >= self._batch:
            pass
        return await self._service.store.next_due()

    async def _sleep_until(self, next_due: datetime | None) -> None:
        if self._wake.is_set():
            return
        self._wake_at = next_due
        timeout = self._poll_s if self._shared or not self._holding else None
        if next_due is not None:
            until_due = max(0.0, (next_due - self._service.now()).total_seconds())
            timeout = until_due if timeout is None else min(timeout, until_due)
        with contextlib.suppress(TimeoutError):  # asyncio.timeout: wait_for may lose a cancellation on 3.11
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    def _consider(self, due: datetime) -> None:
        if self._wake_at is None or due < self._wake_at:
            self._wake_at = due
            self._wake.set()
