"""One trace per multi-stage debt: in memory through the service, and from a real process to a real receiver."""

from datetime import datetime, timedelta

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as WireSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as WireStatus
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from compter.model import PaymentRequest
from tests.otlp_receiver import attributes_of, receiver, wait_for
from tests.realprocess import start_compter
from tests.test_otlp import PROTOCOLS, otlp_env
from tests.test_telemetry import Harness, harness, nanoseconds, stage

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


@pytest.fixture
def h() -> Harness:
    return harness()


def hex_ids(span: ReadableSpan) -> tuple[str, str, str | None]:
    assert span.context is not None
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}", parent


async def test_a_deploy_of_three_stages_is_one_trace_of_four_spans(h: Harness) -> None:
    deploy = await h.service.create({"name": "deploy", "timeout": 900.0, "stages": ("build", "test", "release")})
    assert deploy.trace is not None
    times = [deploy.created + timedelta(seconds=seconds) for seconds in (30, 90, 100)]
    h.clock.now = times[0]
    await h.service.pay(deploy.id, stage("build"))
    h.clock.now = times[1]
    await h.service.pay(deploy.id, stage("test"))
    assert [span.name for span in h.finished_spans()] == ["build", "test"], "stage spans leave as payments arrive"
    h.clock.now = times[2]
    await h.service.pay(deploy.id, stage("release", payoff=True))

    build, test, release, root = h.finished_spans()
    assert [span.name for span in (build, test, release, root)] == ["build", "test", "release", "RUN deploy"]
    assert hex_ids(root) == (deploy.trace.trace_id, deploy.trace.span_id, None)
    for child in (build, test, release):
        assert hex_ids(child)[0] == deploy.trace.trace_id
        assert hex_ids(child)[2] == deploy.trace.span_id
        assert child.kind is SpanKind.INTERNAL
        assert child.attributes is not None
        assert child.attributes["cicd.pipeline.task.name"] == child.name
        assert child.attributes["cicd.pipeline.task.run.result"] == "success"
        assert child.attributes["compter.payment.name"] == child.name
        assert child.attributes["compter.debt.id"] == str(deploy.id)
    starts = [nanoseconds(moment) for moment in (deploy.created, *times[:2])]
    ends = [nanoseconds(moment) for moment in times]
    assert [(span.start_time, span.end_time) for span in (build, test, release)] == list(zip(starts, ends, strict=True))
    assert (root.start_time, root.end_time) == (nanoseconds(deploy.created), nanoseconds(times[2]))
    assert root.kind is SpanKind.SERVER
    assert root.status.status_code is StatusCode.OK
    assert root.attributes is not None
    assert root.attributes["cicd.pipeline.name"] == "deploy"
    assert root.attributes["cicd.pipeline.action.name"] == "RUN"
    assert root.attributes["cicd.pipeline.result"] == "success"
    assert root.attributes["compter.debt.status"] == "paid_off"
    assert root.attributes["compter.debt.stages"] == ("build", "test", "release")
    for log in h.logs.get_finished_logs():
        assert f"{log.log_record.trace_id:032x}" == deploy.trace.trace_id, "events link to the trace"
        assert f"{log.log_record.span_id:016x}" == deploy.trace.span_id


async def test_a_deploy_deleted_while_open_ends_its_trace_as_a_cancelled_run(h: Harness) -> None:
    deploy = await h.service.create({"name": "deploy", "timeout": 600.0, "stages": ("build", "test")})
    assert deploy.trace is not None
    h.clock.advance(30)
    await h.service.pay(deploy.id, stage("build"))
    h.clock.advance(10)
    await h.service.delete(deploy.id)
    build, root = h.finished_spans()
    assert hex_ids(build)[2] == hex_ids(root)[1] == deploy.trace.span_id
    assert (root.start_time, root.end_time) == (nanoseconds(deploy.created), nanoseconds(h.clock.now))
    assert root.status.status_code is StatusCode.UNSET
    assert root.attributes is not None
    assert root.attributes["cicd.pipeline.result"] == "cancellation"
    assert sum(h.values("compter.debt.payoffs").values()) + sum(h.values("compter.debt.timeouts").values()) == 0


async def test_a_timed_out_deploy_ends_its_trace_in_error_with_the_missing_stages(h: Harness) -> None:
    deploy = await h.service.create({"timeout": 600.0, "stages": ("build", "test", "release")})
    assert deploy.trace is not None
    h.clock.advance(100)
    await h.service.pay(deploy.id, stage("build"))
    h.clock.advance(500)
    assert await h.service.sweep() == 1

    build, root = h.finished_spans()
    assert root.name == "RUN", "no pipeline name: the span is named after the action alone"
    assert hex_ids(root)[:2] == (deploy.trace.trace_id, deploy.trace.span_id)
    assert hex_ids(build)[2] == deploy.trace.span_id
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description == "timed out; missing stages: test, release"
    assert root.attributes is not None
    assert root.attributes["compter.debt.missing_stages"] == ("test", "release")
    assert root.attributes["cicd.pipeline.result"] == "timeout"
    assert root.attributes["error.type"] == "timeout"
    assert root.end_time == nanoseconds(h.clock.now)
    assert [name for name, _, _ in h.events()][-1] == "compter.debt.timed_out"
    assert sum(h.values("compter.debt.timeouts").values()) == 1


async def test_a_traceparent_on_creation_joins_the_callers_trace(h: Harness) -> None:
    deploy = await h.service.create({"timeout": 60.0}, traceparent=f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")
    await h.service.pay(deploy.id, stage("build", payoff=True))

    build, root = h.finished_spans()
    assert hex_ids(root)[0] == CALLER_TRACE
    assert hex_ids(root)[2] == CALLER_SPAN
    assert root.parent is not None
    assert root.parent.is_remote
    assert hex_ids(build)[:1] == (CALLER_TRACE,)
    assert hex_ids(build)[2] == hex_ids(root)[1]


async def test_an_unsampled_caller_keeps_the_debts_trace_unsampled(h: Harness) -> None:
    deploy = await h.service.create({"timeout": 60.0}, traceparent=f"00-{CALLER_TRACE}-{CALLER_SPAN}-00")
    await h.service.pay(deploy.id, stage("build", payoff=True))
    assert h.finished_spans() == ()


@pytest.mark.parametrize(("ratio", "exported"), [(0.0, 0), (1.0, 3)])
async def test_the_sampler_decides_once_for_the_whole_trace(ratio: float, exported: int) -> None:
    """A ratio sampler decides on the trace id: the stage spans, exported first, follow the root's decision."""
    h = harness(sampler=ParentBased(TraceIdRatioBased(ratio)))
    deploy = await h.service.create({"timeout": 60.0})
    assert deploy.trace is not None
    assert deploy.trace.sampled is bool(exported)
    await h.service.pay(deploy.id, stage("build"))
    await h.service.pay(deploy.id, stage("release", payoff=True))
    assert len(h.finished_spans()) == exported


async def test_a_bad_traceparent_starts_a_trace_of_its_own(h: Harness) -> None:
    deploy = await h.service.create({"timeout": 60.0}, traceparent="not-a-traceparent")
    assert deploy.trace is not None
    assert deploy.trace.parent_span_id is None
    await h.service.pay(deploy.id, PaymentRequest({}, payoff=True))
    (root,) = h.finished_spans()
    assert root.parent is None
    assert hex_ids(root)[0] == deploy.trace.trace_id


def wire_ids(span: WireSpan) -> tuple[str, str, str]:
    return span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex()


def unix_nanos(timestamp: str) -> int:
    return nanoseconds(datetime.fromisoformat(timestamp))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_real_deploy_reaches_the_receiver_as_one_trace_while_it_runs(protocol: str) -> None:
    with (
        receiver(protocol) as (endpoint, received),
        start_compter(env=otlp_env(endpoint, protocol)) as compter,
        httpx.Client(base_url=compter.url) as http,
    ):
        traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        created = http.post(
            "/debts",
            json={"name": "deploy", "timeout": "15m", "stages": ["build", "test", "release"]},
            headers={"traceparent": traceparent},
        ).json()
        path = f"/debts/{created['id']}"
        paid = [http.post(path, json={"payment": "build"}).json(), http.post(path, json={"payment": "test"}).json()]
        stages = wait_for(lambda: found if len(found := received.spans()) == 2 else None, what="two stage spans")
        assert [span.name for span in stages] == ["build", "test"], "received before the payoff"
        final = http.post(path, json={"payment": "release", "payoff": True}).json()
        assert final["status"] == "paid_off"
        spans = wait_for(lambda: found if len(found := received.spans()) == 4 else None, what="four spans")

    build, test, release, root = spans
    assert [span.name for span in spans] == ["build", "test", "release", "RUN deploy"]
    trace_id, root_id, parent_id = wire_ids(root)
    assert (trace_id, parent_id) == (CALLER_TRACE, CALLER_SPAN)
    assert root.kind == WireSpan.SPAN_KIND_SERVER
    assert root.status.code == WireStatus.STATUS_CODE_OK
    assert attributes_of(root.attributes)["cicd.pipeline.result"] == "success"
    assert root.start_time_unix_nano == unix_nanos(created["created"])
    assert root.end_time_unix_nano == unix_nanos(final["updated"])
    for child in (build, test, release):
        assert wire_ids(child)[0::2] == (trace_id, root_id)
    assert build.start_time_unix_nano == unix_nanos(created["created"])
    assert build.end_time_unix_nano == test.start_time_unix_nano == unix_nanos(paid[0]["updated"])
    assert test.end_time_unix_nano == release.start_time_unix_nano == unix_nanos(paid[1]["updated"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_real_timeout_reaches_the_receiver_as_an_error_with_the_event_and_the_counter(protocol: str) -> None:
    with (
        receiver(protocol) as (endpoint, received),
        start_compter(env=otlp_env(endpoint, protocol)) as compter,
        httpx.Client(base_url=compter.url) as http,
    ):
        created = http.post("/debts", json={"name": "deploy", "timeout": 1, "stages": ["build", "test"]}).json()
        http.post(f"/debts/{created['id']}", json={"payment": "build"})
        root = wait_for(
            lambda: next((span for span in received.spans() if span.name == "RUN deploy"), None), what="the root"
        )
        timeouts = wait_for(lambda: received.latest("compter.debt.timeouts"), what="the timeout counter")
        event = wait_for(
            lambda: next((r for r in received.records() if r.event_name == "compter.debt.timed_out"), None),
            what="the timed_out event",
        )
    assert root.status.code == WireStatus.STATUS_CODE_ERROR
    assert attributes_of(root.attributes)["compter.debt.missing_stages"] == ["test"]
    assert timeouts == {"deploy": 1}
    assert event.attributes["compter.debt.missing_stages"] == ["test"]
    assert event.attributes["compter.debt.id"] == str(created["id"])
    assert [payment["name"] for payment in event.attributes["compter.debt.paid"]] == ["build"]
