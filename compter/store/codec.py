"""A debt as the persistent stores keep it: one JSON document, plus its due time for the index."""

import json
from datetime import UTC, datetime
from typing import Any

from compter.model import Debt, Payment, Status, TraceContext

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode(debt: Debt) -> str:
    """The debt as compact JSON text; `decode` gives back an equal debt."""
    document: dict[str, Any] = {
        "id": debt.id,
        "created": _time(debt.created),
        "updated": _time(debt.updated),
        "name": debt.name,
        "payments": debt.payments,
        "interval": debt.interval,
        "grace": debt.grace,
        "timeout": debt.timeout,
        "stages": list(debt.stages) if debt.stages is not None else None,
        "paid": [[payment.name, _time(payment.at)] for payment in debt.paid],
        "overdue": debt.overdue,
        "trace": None,
        "final": debt.final.value if debt.final is not None else None,
    }
    if debt.trace is not None:
        trace = debt.trace
        document["trace"] = [trace.trace_id, trace.span_id, trace.parent_span_id, trace.sampled]
    return json.dumps(document, separators=(",", ":"))


def decode(text: str | bytes) -> Debt:
    document = json.loads(text)
    trace = document.get("trace")
    stages = document.get("stages")
    final = document.get("final")
    return Debt(
        id=document["id"],
        created=_parse_time(document["created"]),
        updated=_parse_time(document["updated"]),
        name=document.get("name"),
        payments=document.get("payments", 0),
        interval=document.get("interval"),
        grace=document.get("grace", 0.0),
        timeout=document.get("timeout"),
        stages=tuple(stages) if stages is not None else None,
        paid=tuple(Payment(name, _parse_time(at)) for name, at in document.get("paid", ())),
        overdue=document.get("overdue", False),
        trace=TraceContext(*trace) if trace is not None else None,
        final=Status(final) if final is not None else None,
    )


def due_timestamp(debt: Debt) -> float | None:
    """The debt's due time as Unix seconds, for a store's deadline index; None when never due."""
    due = debt.due
    return due.timestamp() if due is not None else None


def _time(moment: datetime) -> int:
    """Microseconds since the epoch: exact, unlike float seconds."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _parse_time(micros: int) -> datetime:
    return datetime.fromtimestamp(micros // 1_000_000, UTC).replace(microsecond=micros % 1_000_000)
