"""How much a payment costs next to the cheapest request, through the real app.

Runs the Quart app in process (no sockets, so the figures are the app's own cost) and
prints requests per second for GET /healthz (the baseline), POST /debts/{id} (a payment)
and a vivifying payment, and each as a ratio of the baseline. Usage:

    python benchmarks/payments.py [requests] [store URL]

The store defaults to memory://; give a fresh sqlite file, PostgreSQL schema or Redis
prefix to measure a persistent store (the benchmark creates debts in it).
"""

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

from compter.app import create_app
from compter.otel import build_telemetry
from compter.service import Service
from compter.store import store_from_url


async def rate(label: str, requests: int, send: Callable[[int], Awaitable[int]], expect: int) -> float:
    started = time.perf_counter()
    for i in range(requests):
        status = await send(i)
        assert status == expect, f"{label}: {status}"
    per_second = requests / (time.perf_counter() - started)
    return per_second


async def main(requests: int, store_url: str) -> None:
    store = store_from_url(store_url)
    await store.open()
    telemetry = build_telemetry({}, max_debts=10_000)
    app = create_app(Service(store, telemetry), telemetry, watch=False)
    client = app.test_client()
    debt_id = (await (await client.post("/debts", json={"interval": 3600})).get_json())["id"]
    print(f"store {store_url}, {requests} requests each")

    async def healthz(_: int) -> int:
        return (await client.get("/healthz")).status_code

    async def pay(_: int) -> int:
        return (await client.post(f"/debts/{debt_id}")).status_code

    async def pay_named(_: int) -> int:
        return (await client.post(f"/debts/{debt_id}", json={"interval": "1h", "name": "nightly"})).status_code

    async def vivify(i: int) -> int:
        return (await client.post(f"/debts/{debt_id + 1000 + i}", json={"interval": "1h"})).status_code

    await rate("warm-up", requests // 10, pay, 200)
    baseline = await rate("GET /healthz", requests, healthz, 200)
    print(f"{'GET /healthz (baseline)':40} {baseline:10.0f} req/s  1.00")
    for label, send, expect in [
        ("POST /debts/{id} (bare payment)", pay, 200),
        ("POST /debts/{id} with its definition", pay_named, 200),
        ("POST /debts/N vivifying", vivify, 201),
    ]:
        per_second = await rate(label, requests, send, expect)
        print(f"{label:40} {per_second:10.0f} req/s  {per_second / baseline:.2f}")
    telemetry.shutdown()
    await store.close()


if __name__ == "__main__":
    asyncio.run(
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000, sys.argv[2] if len(sys.argv) > 2 else "memory://")
    )
