"""`compter serve` and friends."""

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

import click
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from compter import __version__
from compter.app import create_app
from compter.errors import StoreUnavailable
from compter.otel import build_telemetry
from compter.service import Service
from compter.settings import Settings, SettingsError
from compter.store import redact, store_from_url

log = logging.getLogger("compter")

# How long in-flight requests may take to finish after SIGTERM.
GRACEFUL_TIMEOUT_S = 10.0


class StartupError(Exception):
    """Compter cannot start; the message says why and what to do."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="compter")
def cli() -> None:
    """Compter tracks debts: things that must happen, and reports when they do not."""


@cli.command()
@click.option("--host", help="Address to listen on [env COMPTER_HOST; default 127.0.0.1].")
@click.option("--port", help="Port to listen on [env COMPTER_PORT; default 8080].")
@click.option("--store", help="Store URL: memory://, sqlite:///path, postgresql://…, redis://… [env COMPTER_STORE].")
def serve(host: str | None, port: str | None, store: str | None) -> None:
    """Serve the API until SIGTERM or SIGINT."""
    try:
        settings = Settings.load(os.environ, host=host, port=port, store=store)
    except SettingsError as error:
        raise click.UsageError(str(error)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(settings))
    except StartupError as error:
        raise click.UsageError(str(error)) from None


async def _serve(settings: Settings) -> None:
    try:
        store = store_from_url(settings.store)
    except ValueError as error:
        raise StartupError(str(error)) from None
    try:
        await store.open()
    except StoreUnavailable as error:
        raise StartupError(f"cannot open the store {redact(settings.store)}: {error}") from None
    telemetry = build_telemetry(os.environ, max_debts=settings.metrics_max_debts)
    try:
        app = create_app(Service(store, telemetry), telemetry)
        config = Config()
        config.bind = [_bind_address(settings.host, settings.port)]
        config.graceful_timeout = GRACEFUL_TIMEOUT_S
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")  # one format for all of Compter's log lines
        stop = _stop_on_signals()
        log.info("compter %s serving on http://%s with store %s", __version__, config.bind[0], redact(settings.store))
        try:
            await hypercorn_serve(app, config, shutdown_trigger=stop.wait)
        except OSError as error:
            raise StartupError(f"cannot listen on {config.bind[0]}: {error.strerror or error}") from None
    finally:
        await store.close()
        telemetry.shutdown()


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI; a usage error is one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, prog_name="compter", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.ctx.get_help() if error.ctx else error.format_message())
    except click.ClickException as error:
        click.echo(f"compter: error: {error.format_message()}", err=True)
        sys.exit(2)
    except click.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
