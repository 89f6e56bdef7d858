"""What only the SQLite store has: its URL, its file's settings, its schema version, a locked file.

Everything every store does is in test_store_contract.py.
"""

import contextlib
import re
import sqlite3
import time
from pathlib import Path

import pytest

from compter import model
from compter.errors import StoreUnavailable
from compter.store import store_from_url
from compter.store.sqlite import BUSY_TIMEOUT_S, SCHEMA_VERSION, SQLiteStore, parse_url
from tests.fakes import T0


@pytest.mark.parametrize(
    ("url", "path", "synchronous"),
    [
        ("sqlite:///var/lib/compter/compter.db", "/var/lib/compter/compter.db", "normal"),
        ("sqlite:////var/lib/compter/compter.db", "/var/lib/compter/compter.db", "normal"),
        ("sqlite://compter.db", "compter.db", "normal"),
        ("sqlite://data/compter.db", "data/compter.db", "normal"),
        ("sqlite:///srv/my%20debts.db", "/srv/my debts.db", "normal"),
        ("sqlite:///srv/compter.db?synchronous=full", "/srv/compter.db", "full"),
        ("sqlite:///srv/compter.db?synchronous=NORMAL", "/srv/compter.db", "normal"),
    ],
)
def test_url_names_the_file_and_the_synchronous_setting(url: str, path: str, synchronous: str) -> None:
    assert parse_url(url) == (path, synchronous)


@pytest.mark.parametrize(
    ("url", "mentions"),
    [
        ("sqlite://", "names no file"),
        ("sqlite:///srv/compter.db?synchronous=off", "use normal or full"),
        ("sqlite:///srv/compter.db?journal=wal", "unknown option(s) in the sqlite URL: journal"),
    ],
)
def test_a_bad_url_says_how_to_fix_it(url: str, mentions: str) -> None:
    with pytest.raises(ValueError, match=re.escape(mentions)):
        store_from_url(url)


async def test_a_relative_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = store_from_url("sqlite://relative.db")
    await store.open()
    await store.close()
    assert (tmp_path / "relative.db").is_file()


@pytest.mark.parametrize(("option", "level"), [("", 1), ("?synchronous=full", 2)])
async def test_the_file_is_in_wal_mode_with_the_synchronous_level_asked_for(
    tmp_path: Path, option: str, level: int
) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path}/c.db{option}")
    await store.open()
    try:
        assert await store._call(lambda connection: connection.execute("PRAGMA synchronous").fetchone()) == (level,)
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "c.db")) as connection:  # `with connection` does not close it
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_the_schema_version_is_recorded_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    await store.close()
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(StoreUnavailable, match="upgrade Compter"):
        await SQLiteStore(f"sqlite:///{path}").open()


async def test_a_file_locked_by_another_process_is_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    created = await store.create(lambda debt_id: model.create(debt_id, {"interval": 60.0}, T0, None))
    assert created.answer is not None
    debt_id = created.answer.id
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.update(debt_id, lambda debt: model.pay(debt, debt_id, model.PaymentRequest({}), T0, None))
        assert time.monotonic() - started < BUSY_TIMEOUT_S + 2
    finally:
        other.rollback()
        other.close()
    paid = await store.update(debt_id, lambda debt: model.pay(debt, debt_id, model.PaymentRequest({}), T0, None))
    assert paid.answer is not None
    assert await store.get(debt_id) == paid.answer
    assert paid.answer.payments == 1
    await store.close()


async def test_the_watcher_reads_due_debts_from_the_index_not_a_scan(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path}/c.db")
    await store.open()
    statements: list[str] = []
    await store._call(lambda connection: connection.set_trace_callback(statements.append))
    await store.due(T0, 10)
    await store.next_due()
    await store._call(lambda connection: connection.set_trace_callback(None))
    plans = await store._call(
        lambda connection: [connection.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall() for sql in statements]
    )
    await store.close()
    assert len(plans) == 2
    for statement, plan in zip(statements, plans, strict=True):
        details = [row[-1] for row in plan]
        assert any("INDEX debts_due" in detail for detail in details), (statement, details)
        assert not any(detail.startswith("SCAN") for detail in details), (statement, details)
