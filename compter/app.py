"""Assembles the Quart app around a service; the caller owns the store and telemetry."""

import asyncio
import hmac
from typing import Protocol

from quart import Quart, Response, request
from quart_schema import QuartSchema

from compter import __version__
from compter.api import MAX_BODY_BYTES, ApiDocument, debts, error_response, no_content, operations, register_errors
from compter.service import Service
from compter.watcher import Watcher


class PrometheusSource(Protocol):
    def prometheus_text(self) -> tuple[bytes, str]:
        """The current metrics in Prometheus text format, and its content type."""


def create_app(
    service: Service,
    metrics: PrometheusSource,
    *,
    watch: bool = True,
    api_token: str | None = None,
) -> Quart:
    """Build the app; with `watch`, a deadline watcher runs while it serves.

    With an `api_token`, requests that change debts (POST, DELETE) must carry it as
    `Authorization: Bearer <token>`; reading stays open, like /metrics.
    """
    app = Quart("compter")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["compter.service"] = service
    QuartSchema(
        app,
        info={"title": "Compter", "version": __version__},
        redoc_ui_path=None,
        scalar_ui_path=None,
        openapi_provider_class=ApiDocument,
    )
    app.register_blueprint(debts)
    app.register_blueprint(operations)
    register_errors(app)

    @app.after_request
    async def options_without_a_body(response: Response) -> Response:
        """OPTIONS says what the path allows, with no body (Quart's default is an empty text/html page)."""
        if request.method == "OPTIONS" and response.status_code == 200:
            return no_content({"Allow": response.headers["Allow"]})
        return response

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """The metrics in Prometheus text format."""
        # On a thread: with thousands of debts a collection takes a while, and requests must not wait on it.
        body, content_type = await asyncio.to_thread(metrics.prometheus_text)
        return Response(body, content_type=content_type)

    if watch:
        _watch_while_serving(app, Watcher(service))
    if api_token:
        _require_token(app, api_token)
    return app


def _watch_while_serving(app: Quart, watcher: Watcher) -> None:
    @app.before_serving
    async def start() -> None:
        watcher.start()

    @app.after_serving
    async def stop() -> None:
        await watcher.stop()


def _require_token(app: Quart, token: str) -> None:
    expected = token.encode()

    @app.before_request
    async def check_token() -> Response | None:
        if request.method not in ("POST", "DELETE"):
            return None
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        # The scheme is case-insensitive (RFC 9110); the token is compared in constant time.
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), expected):
            return None
        response = error_response(401, "this Compter needs `Authorization: Bearer <token>` to change debts")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
