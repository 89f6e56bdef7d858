"""COMPTER_API_TOKEN: with a token set, only requests that carry it may change debts."""

import pytest
from quart.typing import TestClientProtocol as Client

from compter.app import create_app
from compter.service import Service
from compter.settings import Settings
from tests.fakes import RecordingTelemetry

TOKEN = "s3cret-token"


@pytest.fixture
def guarded(service: Service, telemetry: RecordingTelemetry) -> Client:
    return create_app(service, telemetry, watch=False, api_token=TOKEN).test_client()


@pytest.mark.parametrize(("method", "path"), [("POST", "/debts"), ("POST", "/debts/1"), ("DELETE", "/debts/1")])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"])
async def test_changes_without_the_token_are_401_and_change_nothing(
    guarded: Client, telemetry: RecordingTelemetry, method: str, path: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await guarded.open(path, method=method, json={"interval": 60}, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in (await response.get_json())["error"]
    assert telemetry.events == []


async def test_the_token_lets_changes_through_and_reading_stays_open(guarded: Client) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert (await guarded.post("/debts", json={"interval": 60}, headers=bearer)).status_code == 201
    assert (await guarded.post("/debts/1", headers=bearer)).status_code == 200
    assert (await guarded.get("/debts/1")).status_code == 200
    assert (await guarded.get("/debts")).status_code == 200
    assert (await guarded.get("/metrics")).status_code == 200
    assert (await guarded.get("/healthz")).status_code == 200
    assert (await guarded.delete("/debts/1", headers=bearer)).status_code == 204


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
async def test_the_scheme_is_case_insensitive(guarded: Client, scheme: str) -> None:
    response = await guarded.post("/debts", headers={"Authorization": f"{scheme} {TOKEN}"})
    assert response.status_code == 201


def test_the_token_comes_from_the_environment_and_never_shows_in_settings() -> None:
    settings = Settings.load({"COMPTER_API_TOKEN": TOKEN})
    assert settings.api_token == TOKEN
    assert TOKEN not in repr(settings)
    assert Settings.load({"COMPTER_API_TOKEN": ""}).api_token is None
