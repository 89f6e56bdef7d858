"""Fixtures shared by the tests: a fake clock, a recording telemetry, a service and its app."""

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from compter.app import create_app
from compter.service import Service
from compter.store.memory import MemoryStore
from tests.fakes import FakeClock, RecordingTelemetry
from tests.stores import namespace, shared_store_url, store_url

__all__ = ["namespace", "shared_store_url", "store_url"]  # fixtures for every test module


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def telemetry() -> RecordingTelemetry:
    return RecordingTelemetry()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def service(store: MemoryStore, telemetry: RecordingTelemetry, clock: FakeClock) -> Service:
    return Service(store, telemetry, clock)


@pytest.fixture
def app(service: Service, telemetry: RecordingTelemetry) -> Quart:
    return create_app(service, telemetry, watch=False)


@pytest.fixture
def client(app: Quart) -> Client:
    return app.test_client()
