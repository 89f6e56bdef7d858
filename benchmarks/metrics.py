"""How much a metrics collection costs as the number of debts grows, and what it does to payments.

Builds the real telemetry (the Prometheus reader behind GET /metrics) over a memory
store holding N recurring debts, each paid once, and prints for each N:
- the time one GET /metrics takes, and per debt;
- payments per second while /metrics is scraped back to back, as a ratio of payments
  per second with no scrape (the same process, the same run).
Usage:

    python benchmarks/metrics.py [N ...]      (default: 1000 10000)
"""

import asyncio
import sys
import time

from quart.typing import TestClientProtocol

from compter.app import create_app
from compter.model import PaymentRequest
from compter.otel import build_telemetry
from compter.service import Service
from compter.store.memory import MemoryStore

PAYMENTS = 2000


async def payments_per_second(client: TestClientProtocol, debt_ids: list[int]) -> float:
    started = time.perf_counter()
    for i in range(PAYMENTS):
        response = await client.post(f"/debts/{debt_ids[i % len(debt_ids)]}")
        assert response.status_code == 200
    return PAYMENTS / (time.perf_counter() - started)


async def measure(debts: int) -> None:
    telemetry = build_telemetry({}, max_debts=max(debts, 10_000))
    service = Service(MemoryStore(), telemetry)
    app = create_app(service, telemetry, watch=False)
    client = app.test_client()
    debt_ids = []
    for _ in range(debts):
        debt = await service.create({"interval": 3600.0})
        await service.pay(debt.id, PaymentRequest({}))
        debt_ids.append(debt.id)
    service.report_gauges(await service.all_debts())  # as the watcher's lease holder does

    started = time.perf_counter()
    scraped = await client.get("/metrics")
    scrape_s = time.perf_counter() - started
    assert scraped.status_code == 200

    quiet = await payments_per_second(client, debt_ids)
    scraping = True

    async def scrape_forever() -> int:
        scrapes = 0
        while scraping:
            await client.get("/metrics")
            scrapes += 1
        return scrapes

    scraper = asyncio.ensure_future(scrape_forever())
    await asyncio.sleep(0)
    busy = await payments_per_second(client, debt_ids)
    scraping = False
    scrapes = await scraper
    print(
        f"{debts:>7} debts: GET /metrics {scrape_s * 1000:7.0f} ms ({scrape_s / debts * 1e6:5.1f} µs a debt); "
        f"payments {quiet:6.0f}/s quiet, {busy:6.0f}/s during {scrapes} back-to-back scrapes: {busy / quiet:.2f}"
    )
    telemetry.shutdown()


async def main(sizes: list[int]) -> None:
    for debts in sizes:
        await measure(debts)


if __name__ == "__main__":
    asyncio.run(main([int(arg) for arg in sys.argv[1:]] or [1000, 10_000]))
