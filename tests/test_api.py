"""Every endpoint and every bad-input row of SPEC §2, through Quart's test client."""

import asyncio
import json
import re
import time
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from compter.app import create_app
from compter.service import Service
from tests.fakes import FakeClock, RecordingTelemetry

DEBT_KEYS = ["id", "name", "created", "updated", "payments", "interval", "grace", "timeout", "stages", "paid"]
DEBT_KEYS += ["deadline", "status"]


async def call(client: Client, method: str, path: str, body: object = None, **kwargs: Any) -> Any:
    """Send a request (a str or bytes body is sent as is, anything else as JSON); (status, JSON, headers)."""
    if isinstance(body, str | bytes):
        kwargs["data"] = body
    elif body is not None:
        kwargs["json"] = body
    response = await client.open(path, method=method, **kwargs)
    data = await response.get_data()
    return response.status_code, json.loads(data) if data else None, response.headers


async def create(client: Client, body: object = None) -> dict[str, Any]:
    status, debt, _ = await call(client, "POST", "/debts", body)
    assert status == 201, debt
    return debt  # type: ignore[no-any-return]


async def test_create_answers_201_with_location_and_the_debt(client: Client) -> None:
    status, debt, headers = await call(client, "POST", "/debts", {"name": "nightly-backup", "interval": "1d"})
    assert status == 201
    assert headers["Location"] == f"/debts/{debt['id']}"
    assert headers["Content-Type"] == "application/json"
    assert list(debt) == DEBT_KEYS
    assert debt == {
        "id": 1,
        "name": "nightly-backup",
        "created": "2026-12-03T19:00:00.123456Z",
        "updated": "2026-12-03T19:00:00.123456Z",
        "payments": 0,
        "interval": 86400,
        "grace": 0,
        "timeout": None,
        "stages": None,
        "paid": [],
        "deadline": "2026-12-04T19:00:00.123456Z",
        "status": "ok",
    }


async def test_create_without_a_body_makes_a_plain_debt(client: Client) -> None:
    debt = await create(client)
    assert (debt["interval"], debt["timeout"], debt["deadline"], debt["status"]) == (None, None, None, "ok")


async def test_create_accepts_a_json_body_whatever_its_content_type(client: Client) -> None:
    status, debt, _ = await call(
        client, "POST", "/debts", '{"interval": 90}', headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert (status, debt["interval"]) == (201, 90)


async def test_fractional_seconds_stay_numbers(client: Client) -> None:
    debt = await create(client, {"interval": 1.5, "grace": "1m"})
    assert (debt["interval"], debt["grace"], debt["deadline"]) == (1.5, 60, "2026-12-03T19:01:01.623456Z")


async def test_get_answers_the_debt_or_404(client: Client) -> None:
    debt = await create(client, {"interval": 60})
    assert (await call(client, "GET", f"/debts/{debt['id']}"))[:2] == (200, debt)
    status, body, _ = await call(client, "GET", "/debts/2")
    assert status == 404
    assert "debt 2" in body["error"]


async def test_payment_counts_moves_the_deadline_and_answers_200(
    client: Client, clock: FakeClock, telemetry: RecordingTelemetry
) -> None:
    debt = await create(client, {"interval": 60})
    clock.advance(10)
    status, paid, _ = await call(client, "POST", f"/debts/{debt['id']}")
    assert status == 200
    assert paid["payments"] == 1
    assert paid["updated"] == "2026-12-03T19:00:10.123456Z"
    assert paid["deadline"] == "2026-12-03T19:01:10.123456Z"
    assert telemetry.kinds() == ["created", "paid"]


async def test_recurring_debt_goes_overdue_and_recovers(
    client: Client, clock: FakeClock, service: Service, telemetry: RecordingTelemetry
) -> None:
    debt = await create(client, {"interval": 60, "grace": 10})
    clock.advance(69)
    assert (await call(client, "GET", f"/debts/{debt['id']}"))[1]["status"] == "ok"
    clock.advance(1)
    assert (await call(client, "GET", f"/debts/{debt['id']}"))[1]["status"] == "overdue"
    assert await service.sweep() == 1
    assert telemetry.kinds() == ["created", "overdue"]
    status, paid, _ = await call(client, "POST", f"/debts/{debt['id']}")
    assert (status, paid["status"]) == (200, "ok")
    assert telemetry.kinds() == ["created", "overdue", "paid", "recovered"]


async def test_payment_body_replaces_definition_fields(client: Client) -> None:
    debt = await create(client, {"name": "a", "interval": 60})
    status, paid, _ = await call(client, "POST", f"/debts/{debt['id']}", {"name": "b", "grace": "30s"})
    assert (status, paid["name"], paid["interval"], paid["grace"]) == (200, "b", 60, 30)


async def test_vivifying_payment_creates_the_debt_under_its_id(client: Client, telemetry: RecordingTelemetry) -> None:
    status, debt, headers = await call(client, "POST", "/debts/42", {"interval": "1h", "name": "cron"})
    assert status == 201
    assert headers["Location"] == "/debts/42"
    assert (debt["id"], debt["payments"], debt["name"], debt["interval"]) == (42, 1, "cron", 3600)
    assert telemetry.kinds() == ["vivified", "paid"]
    status, again, _ = await call(client, "POST", "/debts/42", {"interval": "1h", "name": "cron"})
    assert (status, again["payments"]) == (200, 2)


async def test_payment_to_unknown_id_without_definition_is_404_saying_how_to_recreate(
    client: Client,
) -> None:
    status, body, _ = await call(client, "POST", "/debts/42", {"name": "cron"})
    assert status == 404
    assert "interval" in body["error"]
    assert "re-create" in body["error"]


async def test_server_chosen_ids_never_collide_with_vivified_ones(client: Client) -> None:
    await call(client, "POST", "/debts/1", {"interval": 60})
    await call(client, "POST", "/debts/3", {"interval": 60})
    ids = [(await create(client))["id"] for _ in range(3)]
    assert len({1, 3, *ids}) == 5
    await call(client, "POST", "/debts/9223372036854775807", {"interval": 60})
    assert (await create(client))["id"] not in {1, 3, 9223372036854775807, *ids}


async def test_list_is_ordered_by_id_and_filters_and_pages(client: Client, clock: FakeClock) -> None:
    await call(client, "POST", "/debts/5", {"interval": 10})
    await call(client, "POST", "/debts/2", {"interval": 100})
    await call(client, "POST", "/debts/9", {})
    await call(client, "POST", "/debts/9", {"interval": 1000})
    clock.advance(50)
    status, debts, _ = await call(client, "GET", "/debts")
    assert (status, [debt["id"] for debt in debts]) == (200, [2, 5, 9])
    assert [debt["id"] for debt in (await call(client, "GET", "/debts?status=overdue"))[1]] == [5]
    assert [debt["id"] for debt in (await call(client, "GET", "/debts?status=ok"))[1]] == [2, 9]
    assert [debt["id"] for debt in (await call(client, "GET", "/debts?limit=2"))[1]] == [2, 5]
    assert [debt["id"] for debt in (await call(client, "GET", "/debts?limit=2&after=5"))[1]] == [9]
    assert [debt["id"] for debt in (await call(client, "GET", "/debts?status=ok&limit=1&after=2"))[1]] == [9]
    assert (await call(client, "GET", "/debts?status=paid_off"))[1] == []


async def test_delete_answers_204_then_404(client: Client, telemetry: RecordingTelemetry) -> None:
    debt = await create(client, {"interval": 60})
    response = await client.delete(f"/debts/{debt['id']}")
    assert (response.status_code, await response.get_data()) == (204, b"")
    assert (await call(client, "GET", f"/debts/{debt['id']}"))[0] == 404
    assert (await call(client, "DELETE", f"/debts/{debt['id']}"))[0] == 404
    assert telemetry.kinds() == ["created", "deleted"]


async def test_operations_endpoints(client: Client) -> None:
    assert (await call(client, "GET", "/healthz"))[0] == 200
    assert (await call(client, "GET", "/readyz"))[0] == 200
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["Content-Type"].startswith("text/plain")
    status, document, _ = await call(client, "GET", "/openapi.json")
    assert status == 200
    assert {"/debts", "/debts/{debt_id}", "/healthz", "/readyz", "/metrics"} <= set(document["paths"])
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "/openapi.json" in (await docs.get_data(as_text=True))


def json_schema_keys(node: object) -> set[str]:
    """Every key used anywhere in a JSON document."""
    if isinstance(node, dict):
        return set(node).union(*(json_schema_keys(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(json_schema_keys(value) for value in node))
    return set()


async def test_the_openapi_document_gives_every_status_and_durations_as_the_api_takes_them(client: Client) -> None:
    _, document, _ = await call(client, "GET", "/openapi.json")
    responses = {
        (method.upper(), path): operation["responses"]
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    assert {route: sorted(statuses) for route, statuses in responses.items() if route[1].startswith("/debts")} == {
        ("GET", "/debts"): ["200", "400", "503"],
        ("POST", "/debts"): ["201", "400", "413", "503"],
        ("GET", "/debts/{debt_id}"): ["200", "400", "404", "503"],
        ("POST", "/debts/{debt_id}"): ["200", "201", "400", "404", "413", "503"],
        ("DELETE", "/debts/{debt_id}"): ["204", "400", "404", "503"],
    }
    assert "content" not in responses["DELETE", "/debts/{debt_id}"]["204"]
    assert responses["GET", "/debts"]["200"]["description"] == "The debts, ordered by id."
    assert responses["POST", "/debts"]["400"]["content"]["application/json"]["schema"]["required"] == ["error"]
    # pydantic writes its own names for limits past a validator; JSON Schema tools read only these.
    assert not json_schema_keys(document) & {"gt", "ge", "lt", "le"}
    body = document["paths"]["/debts"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for field in ("interval", "grace", "timeout"):
        kinds = {kind["type"]: kind for kind in alternatives(body["properties"][field])}
        assert set(kinds) == {"number", "string", "null"} - ({"null"} if field == "grace" else set())
        assert re.search(kinds["string"]["pattern"], "1h30m")
        assert not re.search(kinds["string"]["pattern"], "1.5h")
        assert kinds["number"]["maximum"] == 365 * 24 * 3600
    assert "exclusiveMinimum" in json_schema_keys(body["properties"]["interval"])
    assert "minimum" in json_schema_keys(body["properties"]["grace"])


def alternatives(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternatives of a schema, `anyOf`s flattened."""
    if "anyOf" not in schema:
        return [schema]
    return [kind for alternative in schema["anyOf"] for kind in alternatives(alternative)]


async def test_readyz_is_503_when_the_store_does_not_answer(client: Client, service: Service) -> None:
    async def down() -> None:
        from compter.errors import StoreUnavailable

        raise StoreUnavailable("connection refused")

    service.store.ping = down  # type: ignore[method-assign]
    status, body, _ = await call(client, "GET", "/readyz")
    assert status == 503
    assert "connection refused" in body["error"]


BAD_IDS = ["abc", "0", "-1", "9223372036854775808", "1.5", "1e3", "99999999999999999999999", "00", "+1", "0x1"]


async def test_an_id_may_have_leading_zeros(client: Client) -> None:
    status, debt, headers = await call(client, "POST", "/debts/" + "0" * 20 + "7", {"interval": 60})
    assert (status, debt["id"], headers["Location"]) == (201, 7, "/debts/7")
    assert (await call(client, "GET", "/debts/007"))[1] == debt


@pytest.mark.parametrize("bad_id", BAD_IDS)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_malformed_ids_are_400(client: Client, method: str, bad_id: str) -> None:
    status, body, _ = await call(client, method, f"/debts/{bad_id}", {"interval": 60} if method == "POST" else None)
    assert status == 400
    assert "debt id" in body["error"]


BAD_BODIES: list[tuple[object, str]] = [
    ("{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('"text"', "JSON object"),
    ("42", "JSON object"),
    ("null", "JSON object"),
    ({"intervall": 60}, "intervall"),
    ({"interval": "soon"}, "interval"),
    ({"interval": True}, "interval"),
    ({"interval": 0}, "interval"),
    ({"interval": -5}, "interval"),
    ({"interval": 365 * 86400 + 1}, "interval"),
    ({"interval": "366d"}, "interval"),
    ({"interval": "NaN"}, "interval"),
    ({"interval": " 1h"}, "interval"),
    ('{"interval": 1' + "0" * 400 + "}", "interval"),
    ('{"grace": 1' + "0" * 400 + "}", "grace"),
    ("[" * 30000 + "]" * 30000, "JSON"),  # too deep for Python's parser: 400, not a RecursionError's 500
    ('{"interval": 60, "interval": 120}', "more than once in the body: interval"),
    ({"grace": -1}, "grace"),
    ({"grace": None}, "grace"),
    ({"grace": "400d"}, "grace"),
    ({"timeout": 0}, "timeout"),
    ({"interval": 60, "timeout": 60}, "at most one"),
    ({"name": 5}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"stages": "a"}, "stages"),
    ({"stages": ["ok", "not ok"]}, "stages"),
    ({"stages": [""]}, "stages"),
    ({"stages": ["x" * 65]}, "stages"),
    ({"stages": [f"s{i}" for i in range(101)]}, "stages"),
    ({"stages": ["a", "a"]}, "once"),
    ({"timeout": 60, "stages": [1]}, "stages"),
    ({"stages": ["deploy"]}, "timeout"),
]


@pytest.mark.parametrize(("body", "mentions"), BAD_BODIES)
async def test_bad_create_bodies_are_400_and_create_nothing(client: Client, body: object, mentions: str) -> None:
    status, answer, headers = await call(client, "POST", "/debts", body)
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    assert mentions in answer["error"]
    assert (await call(client, "GET", "/debts"))[1] == []


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        *BAD_BODIES,
        ({"payoff": "yes"}, "payoff"),
        ({"payoff": 1}, "payoff"),
        ({"payoff": None}, "payoff"),
        ({"payment": "a b"}, "payment"),
        ({"payment": ""}, "payment"),
        ({"payment": "x" * 65}, "payment"),
        ({"payment": ["build"]}, "payment"),
    ],
)
async def test_bad_payment_bodies_are_400_and_change_nothing(
    client: Client, telemetry: RecordingTelemetry, body: object, mentions: str
) -> None:
    debt = await create(client, {"name": "keep", "interval": 60})
    status, answer, _ = await call(client, "POST", f"/debts/{debt['id']}", body)
    assert status == 400
    assert mentions in answer["error"]
    assert (await call(client, "GET", f"/debts/{debt['id']}"))[1] == debt
    assert telemetry.kinds() == ["created"]


async def test_bad_vivifying_payment_creates_nothing(client: Client) -> None:
    status, _, _ = await call(client, "POST", "/debts/42", {"interval": 60, "typo": 1})
    assert status == 400
    assert (await call(client, "GET", "/debts/42"))[0] == 404


@pytest.mark.parametrize(
    ("query", "mentions"),
    [
        *(("status=late", "status"), ("limit=0", "limit"), ("limit=x", "limit"), ("after=-1", "after")),
        *(("limit=9223372036854775808", "limit"), ("after=9223372036854775808", "after"), ("sort=id", "sort")),
        *(("limit=1.0", "limit"), ("after=1e3", "after"), ("limit=+5", "limit"), ("limit=%D9%A1", "limit")),
    ],
)
async def test_bad_list_queries_are_400(client: Client, query: str, mentions: str) -> None:
    status, answer, _ = await call(client, "GET", f"/debts?{query}")
    assert status == 400
    assert mentions in answer["error"]


@pytest.mark.parametrize(
    ("query", "mentions"),
    [
        ("payoff=maybe", "payoff"),
        ("payoff=1", "payoff"),
        ("payment=a%20b", "payment"),
        ("payment=", "payment"),
        (f"payment={'x' * 65}", "payment"),
        ("payment=a/b", "payment"),
        ("paymnet=x", "paymnet"),
    ],
)
async def test_bad_payment_queries_are_400_and_change_nothing(
    client: Client, telemetry: RecordingTelemetry, query: str, mentions: str
) -> None:
    debt = await create(client, {"timeout": 60})
    status, answer, _ = await call(client, "POST", f"/debts/{debt['id']}?{query}")
    assert status == 400
    assert mentions in answer["error"]
    assert (await call(client, "GET", f"/debts/{debt['id']}"))[1] == debt
    assert telemetry.kinds() == ["created"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/debts/1"), ("DELETE", "/debts/1")])
async def test_one_debt_takes_no_query_parameters(client: Client, method: str, path: str) -> None:
    debt = await create(client)
    status, answer, _ = await call(client, method, f"{path}?payment=x")
    assert (status, "unknown query parameter(s): payment; it takes none" in answer["error"]) == (400, True)
    assert (await call(client, "GET", path))[1] == debt


@pytest.mark.parametrize("query", ["interval=60", "payoff=true"])
async def test_create_takes_no_query_parameters(client: Client, query: str) -> None:
    status, answer, _ = await call(client, "POST", f"/debts?{query}")
    assert status == 400
    assert "unknown query parameter" in answer["error"]
    assert (await call(client, "GET", "/debts"))[1] == []


async def test_the_largest_page_bounds_are_accepted(client: Client) -> None:
    await create(client)
    assert len((await call(client, "GET", "/debts?limit=9223372036854775807&after=0"))[1]) == 1
    assert (await call(client, "GET", "/debts?after=9223372036854775807"))[1] == []


async def test_body_over_64_kib_is_413(client: Client) -> None:
    big = json.dumps({"name": "x" * (64 * 1024)})
    status, answer, _ = await call(client, "POST", "/debts", big)
    assert status == 413
    assert "64" in answer["error"] or "65536" in answer["error"]
    assert (await call(client, "GET", "/debts"))[1] == []


async def test_body_of_exactly_64_kib_is_read(client: Client) -> None:
    body = '{"interval": 60}'.ljust(64 * 1024)
    assert (await call(client, "POST", "/debts", body))[0] == 201


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("PUT", "/debts/1", 405), ("PATCH", "/debts", 405), ("DELETE", "/healthz", 405)],
)
async def test_unknown_paths_and_wrong_methods_answer_json(client: Client, method: str, path: str, status: int) -> None:
    got, answer, headers = await call(client, method, path)
    assert got == status
    assert headers["Content-Type"] == "application/json"
    assert path in answer["error"]


@pytest.mark.parametrize(("path", "allowed"), [("/debts", {"GET", "POST"}), ("/debts/1", {"GET", "POST", "DELETE"})])
async def test_options_answers_204_with_allow(client: Client, path: str, allowed: set[str]) -> None:
    response = await client.options(path)
    assert (response.status_code, await response.get_data()) == (204, b"")
    assert allowed <= {method.strip() for method in response.headers["Allow"].split(",")}


class SlowMetrics:
    """A collection that takes as long as one over many thousands of debts."""

    def prometheus_text(self) -> tuple[bytes, str]:
        time.sleep(0.5)
        return b"", "text/plain"


async def test_a_slow_metrics_collection_does_not_hold_up_other_requests(service: Service) -> None:
    client = create_app(service, SlowMetrics(), watch=False).test_client()
    scrape = asyncio.ensure_future(client.get("/metrics"))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert (await client.get("/healthz")).status_code == 200
    assert time.monotonic() - started < 0.25
    assert (await scrape).status_code == 200
