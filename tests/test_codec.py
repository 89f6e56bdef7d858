"""The JSON form the persistent stores keep a debt in, and the due time they index it by."""

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from compter.model import MAX_ID, Debt, Payment, Status, TraceContext
from compter.store.codec import decode, due_timestamp, encode
from tests.fakes import T0

DEBTS = [
    pytest.param(Debt(id=1, created=T0, updated=T0), id="plain"),
    pytest.param(
        Debt(
            id=MAX_ID,
            created=T0,
            updated=T0 + timedelta(days=400, microseconds=1),
            name='nächtliche Sicherung ✓ "quoted"',
            payments=2**40,
            interval=0.001,
            grace=31_536_000.0,
            overdue=True,
        ),
        id="recurring",
    ),
    pytest.param(
        Debt(
            id=7,
            created=T0,
            updated=T0 + timedelta(seconds=3),
            payments=3,
            timeout=900,
            stages=("build", "test", "ship"),
            paid=(
                Payment("build", T0 + timedelta(seconds=1)),
                Payment("test", T0 + timedelta(microseconds=2_999_999)),
            ),
            trace=TraceContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "00f067aa0ba902b7", False),
        ),
        id="multi-stage",
    ),
    pytest.param(Debt(id=8, created=T0, updated=T0, timeout=1.5, stages=(), final=Status.TIMED_OUT), id="final"),
]


@pytest.mark.parametrize("debt", DEBTS)
def test_decode_gives_back_an_equal_debt(debt: Debt) -> None:
    decoded = decode(encode(debt))
    assert decoded == debt
    assert type(decoded.stages) is type(debt.stages)
    for moment in [decoded.created, decoded.updated, *(payment.at for payment in decoded.paid)]:
        assert moment.tzinfo is UTC


@pytest.mark.parametrize("debt", DEBTS)
def test_encoding_is_compact_and_stable(debt: Debt) -> None:
    text = encode(debt)
    assert text == json.dumps(json.loads(text), separators=(",", ":"))
    assert encode(decode(text)) == text
    assert decode(text.encode()) == debt


def test_times_are_exact_microseconds_whatever_the_offset_given() -> None:
    paris = timezone(timedelta(hours=1))
    moment = datetime(2026, 12, 3, 20, 0, 0, 999_999, tzinfo=paris)
    debt = decode(encode(Debt(id=1, created=moment, updated=moment)))
    assert debt.created == datetime(2026, 12, 3, 19, 0, 0, 999_999, tzinfo=UTC)
    assert debt.created.tzinfo is UTC
    assert json.loads(encode(debt))["created"] == int(moment.timestamp()) * 1_000_000 + 999_999


def test_a_document_written_before_optional_keys_existed_decodes_with_defaults() -> None:
    micros = int(T0.timestamp()) * 1_000_000 + T0.microsecond
    debt = decode(json.dumps({"id": 5, "created": micros, "updated": micros}))
    assert debt == Debt(id=5, created=T0, updated=T0)


@pytest.mark.parametrize(
    ("debt", "due"),
    [
        pytest.param(Debt(id=1, created=T0, updated=T0), None, id="plain: never"),
        pytest.param(
            Debt(id=1, created=T0, updated=T0 + timedelta(seconds=5), interval=60, grace=30),
            T0 + timedelta(seconds=95),
            id="recurring: updated + interval + grace",
        ),
        pytest.param(
            Debt(id=1, created=T0, updated=T0, interval=60, overdue=True), None, id="announced overdue: not again"
        ),
        pytest.param(
            Debt(id=1, created=T0, updated=T0 + timedelta(seconds=5), timeout=120),
            T0 + timedelta(seconds=120),
            id="multi-stage: created + timeout",
        ),
        pytest.param(Debt(id=1, created=T0, updated=T0, timeout=120, final=Status.PAID_OFF), None, id="cleared: never"),
    ],
)
def test_due_timestamp_is_the_due_time_in_unix_seconds(debt: Debt, due: datetime | None) -> None:
    expected = due.timestamp() if due is not None else None
    assert due_timestamp(debt) == expected
    if due is not None:
        assert datetime.fromtimestamp(due_timestamp(debt) or 0, UTC) == due
