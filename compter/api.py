"""The HTTP API: routes, request and response models, and the one error table."""

import inspect
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    StrictStr,
    ValidationError,
    WithJsonSchema,
)
from quart import Blueprint, Quart, Response, current_app, request
from quart_schema import OpenAPIProvider, document_querystring, document_request, document_response
from werkzeug.exceptions import HTTPException

from compter import model
from compter.durations import DURATION_PATTERN, parse_duration
from compter.errors import CompterError, Invalid, NotFound, StoreUnavailable
from compter.model import Debt, PaymentRequest, Status, rfc3339
from compter.service import Service

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
_ID = re.compile(r"0*[0-9]{1,19}")
_STATUS_OF: dict[type[CompterError], int] = {Invalid: 400, NotFound: 404, StoreUnavailable: 503}

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R", bound=Callable[..., Any])


def _duration_schema(lowest: Literal["exclusiveMinimum", "minimum"]) -> WithJsonSchema:
    """What the document says of a duration: pydantic would say a float, with limits no JSON Schema tool reads."""
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", lowest: 0, "maximum": model.YEAR_S},
                {"type": "string", "pattern": DURATION_PATTERN, "minLength": 2},
            ],
            "description": 'seconds, or a string like "90s", "1h30m", "2d"; at most a year',
        }
    )


Seconds = Annotated[float, BeforeValidator(parse_duration)]
Interval = Annotated[Seconds, Field(gt=0, le=model.YEAR_S), _duration_schema("exclusiveMinimum")]
Grace = Annotated[Seconds, Field(ge=0, le=model.YEAR_S), _duration_schema("minimum")]
StageName = Annotated[StrictStr, Field(pattern=model.STAGE_NAME.pattern)]


def _distinct(stages: list[str]) -> list[str]:
    if len(set(stages)) != len(stages):
        raise ValueError("names each stage once")
    return stages


Stages = Annotated[list[StageName], Field(max_length=model.MAX_STAGES), AfterValidator(_distinct)]


class Definition(BaseModel):
    """What a debt is: the fields a create or a payment may set."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[StrictStr, Field(max_length=model.MAX_NAME_LENGTH)] | None = None
    interval: Interval | None = Field(None, description="a recurring debt: at least one payment every interval")
    grace: Grace = 0.0
    timeout: Interval | None = Field(None, description="a multi-stage debt: paid off within timeout of created")
    stages: Stages | None = Field(None, description="the named payments a multi-stage debt expects, in order")

    def changes(self) -> dict[str, object]:
        """The fields the client sent, ready for the domain."""
        sent = {field: getattr(self, field) for field in self.model_fields_set & model.DEFINITION_FIELDS}
        if sent.get("stages") is not None:
            sent["stages"] = tuple(sent["stages"])
        return sent


class PaymentBody(Definition):
    payment: StageName | None = Field(None, description="the name of the stage this payment pays")
    payoff: StrictBool = Field(False, description="true pays off a multi-stage debt")


class PaymentQuery(BaseModel):
    """The query form of a payment, for a bare `curl -X POST`."""

    payment: StageName | None = None
    payoff: Literal["true", "false"] | None = None


def _digits(value: object) -> object:
    """A query's whole number is written in digits, as an id is: `1.0` or `1e3` is a mistake."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number written in digits")
    return value


Digits = BeforeValidator(_digits)


class ListQuery(BaseModel):
    # The limits before the validator: after it, pydantic documents them as `ge`/`le`, which no JSON Schema tool reads.
    status: Status | None = None
    limit: Annotated[int, Field(ge=1, le=model.MAX_ID), Digits] | None = None
    after: Annotated[int, Field(ge=0, le=model.MAX_ID), Digits] | None = None


class NoQuery(BaseModel):
    """Endpoints whose every input is in the path or the body: a query string there is a mistake."""


class PaidModel(BaseModel):
    name: str
    at: str


class DebtModel(BaseModel):
    """The debt, as it is now."""

    id: int
    name: str | None
    created: str
    updated: str
    payments: int
    interval: float | None
    grace: float
    timeout: float | None
    stages: list[str] | None
    paid: list[PaidModel]
    deadline: str | None
    status: Status


class DebtList(RootModel[list[DebtModel]]):
    """The debts, ordered by id."""


class StatusModel(BaseModel):
    """It is: the process serves (/healthz), or its store answers too (/readyz)."""

    status: str


class ErrorModel(BaseModel):
    """What went wrong, as a sentence a person can act on."""

    error: str


class NoContent:
    """No body."""


class ApiDocument(OpenAPIProvider):
    """quart-schema's OpenAPI document, where a response documented with NoContent has no body."""

    def build_response_object(
        self, model: type[Any], headers_model: type[Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if model is NoContent:
            return {"description": inspect.getdoc(NoContent)}, {}
        return super().build_response_object(model, headers_model)


def _document_errors(*statuses: int) -> Callable[[R], R]:
    """Document the error responses a route may give, each an ErrorModel; every route may answer 503."""

    def decorate(route: R) -> R:
        for status in (*statuses, 503):
            route = document_response(ErrorModel, status)(route)
        return route

    return decorate


def _seconds(value: float | None) -> float | int | None:
    return int(value) if value is not None and value.is_integer() else value


def debt_json(debt: Debt, now: datetime) -> dict[str, Any]:
    deadline = debt.deadline
    return {
        "id": debt.id,
        "name": debt.name,
        "created": rfc3339(debt.created),
        "updated": rfc3339(debt.updated),
        "payments": debt.payments,
        "interval": _seconds(debt.interval),
        "grace": _seconds(debt.grace),
        "timeout": _seconds(debt.timeout),
        "stages": list(debt.stages) if debt.stages is not None else None,
        "paid": [{"name": payment.name, "at": rfc3339(payment.at)} for payment in debt.paid],
        "deadline": rfc3339(deadline) if deadline is not None else None,
        "status": debt.status(now).value,
    }


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")), status=status, headers=headers, content_type="application/json"
    )


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def no_content(headers: dict[str, str] | None = None) -> Response:
    """204, without the text/html content type Quart would give an empty body."""
    response = Response(status=204, headers=headers)
    del response.headers["Content-Type"]
    return response


def _service() -> Service:
    service: Service = current_app.extensions["compter.service"]
    return service


def _debt_id(text: str) -> int:
    if _ID.fullmatch(text):
        debt_id = int(text)
        if 1 <= debt_id <= model.MAX_ID:
            return debt_id
    raise Invalid(f"debt id {text!r} is not an integer from 1 to {model.MAX_ID}")


async def _body(model_class: type[M]) -> M:
    data = await request.get_data()
    if not data.strip():
        return model_class()
    try:
        document = json.loads(data, object_pairs_hook=_object_without_repeats)
    except (ValueError, UnicodeDecodeError) as error:
        raise Invalid(f"the body is not valid JSON ({error})") from None
    except RecursionError:
        raise Invalid("the body is not valid JSON (nested too deeply)") from None
    if not isinstance(document, dict):
        raise Invalid('the body must be a JSON object, like {"interval": "1h"}')
    return model_class.model_validate(document)


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice, which would otherwise pass silently as its last value."""
    document = dict(pairs)
    if len(document) != len(pairs):
        repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise Invalid(f"key(s) given more than once in the body: {', '.join(repeated)}")
    return document


def _query(model_class: type[M]) -> M:
    unknown = set(request.args) - set(model_class.model_fields)
    if unknown:
        allowed = f"allowed: {', '.join(model_class.model_fields)}" if model_class.model_fields else "it takes none"
        raise Invalid(f"unknown query parameter(s): {', '.join(sorted(unknown))}; {allowed}")
    repeated = sorted(key for key, values in request.args.lists() if len(values) > 1)
    if repeated:
        raise Invalid(f"query parameter(s) given more than once: {', '.join(repeated)}")
    return model_class.model_validate(request.args.to_dict())


def _no_query() -> None:
    if request.args:
        _query(NoQuery)


def _location(debt: Debt) -> dict[str, str]:
    return {"Location": f"/debts/{debt.id}"}


def _describe(error: ValidationError) -> str:
    """One sentence per problem, naming the field, as a person would say it."""
    problems = []
    for detail in error.errors(include_url=False):
        where = ".".join(str(part) for part in detail["loc"]) or "the body"
        if detail["type"] == "extra_forbidden":
            problems.append(f"unknown key `{where}` (check its spelling)")
        else:
            message = detail["msg"].removeprefix("Value error, ")
            problems.append(f"`{where}`: {message}")
    return "invalid request: " + "; ".join(problems)


debts = Blueprint("debts", __name__)


@debts.post("/debts")
@document_request(Definition)
@document_response(DebtModel, 201)
@_document_errors(400, 413)
async def create_debt() -> Response:
    """Create a debt."""
    _no_query()
    body = await _body(Definition)
    service = _service()
    debt = await service.create(body.changes(), request.headers.get("traceparent"))
    return json_response(debt_json(debt, service.now()), 201, _location(debt))


@debts.get("/debts")
@document_querystring(ListQuery)
@document_response(DebtList)
@_document_errors(400)
async def list_debts() -> Response:
    """List debts, ordered by id."""
    query = _query(ListQuery)
    service = _service()
    found = await service.list_debts(status=query.status, after=query.after or 0, limit=query.limit)
    now = service.now()
    return json_response([debt_json(debt, now) for debt in found])


@debts.get("/debts/<debt_id>")
@document_response(DebtModel)
@_document_errors(400, 404)
async def get_debt(debt_id: str) -> Response:
    """One debt."""
    _no_query()
    service = _service()
    debt = await service.get(_debt_id(debt_id))
    return json_response(debt_json(debt, service.now()))


@debts.post("/debts/<debt_id>")
@document_querystring(PaymentQuery)
@document_request(PaymentBody)
@document_response(DebtModel, 200)
@document_response(DebtModel, 201)
@_document_errors(400, 404, 413)
async def pay_debt(debt_id: str) -> Response:
    """Pay a debt; a payment carrying `interval` or `timeout` re-creates a lost debt (201)."""
    parsed_id = _debt_id(debt_id)
    body = await _body(PaymentBody)
    payment, payoff = body.payment, body.payoff
    if request.args:
        query = _query(PaymentQuery)
        if query.payment is not None:
            if payment is not None and payment != query.payment:
                raise Invalid("the query and the body name different payments")
            payment = query.payment
        if query.payoff is not None:
            if "payoff" in body.model_fields_set and payoff != (query.payoff == "true"):
                raise Invalid("the query and the body disagree on `payoff`")
            payoff = query.payoff == "true"
    definition = body.changes()
    service = _service()
    debt, vivified = await service.pay(
        parsed_id, PaymentRequest(definition, payment, payoff), request.headers.get("traceparent")
    )
    if vivified:
        return json_response(debt_json(debt, service.now()), 201, _location(debt))
    return json_response(debt_json(debt, service.now()))


@debts.delete("/debts/<debt_id>")
@document_response(NoContent, 204)
@_document_errors(400, 404)
async def delete_debt(debt_id: str) -> Response:
    """Delete a debt."""
    _no_query()
    await _service().delete(_debt_id(debt_id))
    return no_content()


operations = Blueprint("operations", __name__)


@operations.get("/healthz")
@document_response(StatusModel)
async def healthz() -> Response:
    """200 while the process serves."""
    return json_response({"status": "ok"})


@operations.get("/readyz")
@document_response(StatusModel)
@_document_errors()
async def readyz() -> Response:
    """200 when the store answers, 503 when it does not."""
    await _service().store.ping()
    return json_response({"status": "ready"})


def register_errors(app: Quart) -> None:
    """Every error, whatever raised it, leaves as {"error": "..."}."""

    @app.errorhandler(CompterError)
    async def domain_error(error: CompterError) -> Response:
        return error_response(_STATUS_OF.get(type(error), 400), str(error))

    @app.errorhandler(ValidationError)
    async def validation_error(error: ValidationError) -> Response:
        return error_response(400, _describe(error))

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = {
            404: f"no such path: {request.method} {request.path}; see /docs for the API",
            405: f"{request.method} is not allowed on {request.path}; see /docs for the API",
            413: f"the body is larger than {MAX_BODY_BYTES} bytes",
        }.get(status, error.description or error.name)
        response = error_response(status, message)
        if status == 405 and error.get_response().headers.get("Allow"):
            response.headers["Allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal error; the server log has the details")
