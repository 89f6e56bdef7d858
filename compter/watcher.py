"""The deadline loop: sleeps until the earliest due time, then lets the service act."""

import asyncio
import contextlib
import logging
from datetime import datetime

from compter.errors import StoreUnavailable
from compter.service import Service

log = logging.getLogger(__name__)


class Watcher:
    """Acts on passed deadlines within `max_sleep_s` plus the time a sweep takes.

    It sleeps until the earliest due time the store reports, and is woken early
    when the service gives a debt an earlier one. `max_sleep_s` bounds the sleep
    so that due times written by other processes sharing the store are seen too.
    """

    def __init__(self, service: Service, max_sleep_s: float | None = None, batch: int = 100) -> None:
        self._service = service
        self._max_sleep_s = max_sleep_s
        self._batch = batch
        self._wake = asyncio.Event()
        self._wake_at: datetime | None = None
        service.on_due(self._consider)

    async def run(self) -> None:
        while True:
            # Cleared before the sweep, so a due time given while it runs still wakes the next sleep.
            self._wake.clear()
            self._wake_at = None
            try:
                await self._sweep_all()
                next_due = await self._service.store.next_due()
            except StoreUnavailable as error:
                log.warning("watcher: %s; retrying in 1 s", error)
                await asyncio.sleep(1)
                continue
            except Exception:
                log.exception("watcher: unexpected error; retrying in 1 s")
                await asyncio.sleep(1)
                continue
            await self._sleep_until(next_due)

    async def _sweep_all(self) -> None:
        while await self._service.sweep(self._batch) >= self._batch:
            pass

    async def _sleep_until(self, next_due: datetime | None) -> None:
        if self._wake.is_set():
            return
        self._wake_at = next_due
        timeout = self._max_sleep_s
        if next_due is not None:
            until_due = max(0.0, (next_due - self._service.now()).total_seconds())
            timeout = until_due if timeout is None else min(timeout, until_due)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _consider(self, due: datetime) -> None:
        if self._wake_at is None or due < self._wake_at:
            self._wake_at = due
            self._wake.set()
