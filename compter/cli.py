"""`compter serve` and friends."""

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

import click
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from compter import __version__
from compter.app import create_app
from compter.errors import StoreUnavailable
from compter.otel import build_telemetry
from compter.service import Service
from compter.settings import Settings, SettingsError
from compter.store import Store, redact, store_from_url

log = logging.getLogger("compter")

# How long in-flight requests may take to finish after SIGTERM.
GRACEFUL_TIMEOUT_S = 10.0
# How long `--workers` gives its workers to exit once stopping: their requests in flight, the lease's
# release and the telemetry flush, within the 30 s that systemd and Docker allow before SIGKILL.
WORKER_STOP_DEADLINE_S = 25.0
# Longer than clients keep idle connections (httpx 5 s, like Hypercorn's default), so that the server
# never closes a kept-alive connection just as a client sends on it.
KEEP_ALIVE_TIMEOUT_S = 75.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StartupError(Exception):
    """Compter cannot start; the message says why and what to do."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="compter")
def cli() -> None:
    """Compter tracks debts: things that must happen, and reports when they do not."""


@cli.command()
@click.option("--host", help="Address to listen on [env COMPTER_HOST; default 127.0.0.1].")
@click.option("--port", help="Port to listen on [env COMPTER_PORT; default 8080].")
@click.option(
    "--store",
    help="Store URL: memory://, sqlite:///path, postgresql://…, redis://… [env COMPTER_STORE; default memory://].",
)
@click.option(
    "--workers", help="Processes sharing the port and the store (postgresql:// or redis:// only) [env COMPTER_WORKERS]."
)
def serve(host: str | None, port: str | None, store: str | None, workers: str | None) -> None:
    """Serve the API until SIGTERM or SIGINT."""
    try:
        settings = Settings.load(os.environ, host=host, port=port, store=store, workers=workers)
    except SettingsError as error:
        raise click.UsageError(str(error)) from None
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        backend = _open_store(settings)  # a bad store URL is named before the port is taken
        if settings.workers == 1:
            asyncio.run(_serve(settings, _listen(settings), backend))
        else:
            asyncio.run(_check_store(settings, backend))
            sys.exit(_supervise(settings, _listen(settings)))
    except StartupError as error:
        raise click.UsageError(str(error)) from None


def _open_store(settings: Settings) -> Store:
    try:
        return store_from_url(settings.store)
    except ValueError as error:
        raise StartupError(str(error)) from None


async def _start_store(settings: Settings, store: Store) -> None:
    try:
        await store.open()
    except StoreUnavailable as error:
        raise StartupError(f"cannot open the store {redact(settings.store)}: {error}") from None


async def _check_store(settings: Settings, store: Store) -> None:
    """Refuse --workers on a store that only one process may use, and an unreachable store, before forking."""
    if not store.shared:
        raise StartupError(
            f"--workers {settings.workers} needs a store several processes can share "
            f"(postgresql:// or redis://), not {redact(settings.store)}"
        )
    await _start_store(settings, store)
    await store.close()


def _listen(settings: Settings) -> socket.socket:
    """Bind the port once, here, so that every worker accepts on the same socket."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        listener = socket.create_server((settings.host, settings.port), family=family, backlog=1024)
    except OSError as error:
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {error.strerror or error}") from None
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.set_inheritable(True)
    return listener


async def _serve(settings: Settings, listener: socket.socket, store: Store) -> None:
    await _start_store(settings, store)
    telemetry = build_telemetry(os.environ, max_debts=settings.metrics_max_debts)
    try:
        app = create_app(Service(store, telemetry), telemetry, api_token=settings.api_token)
        config = Config()
        config.bind = [f"fd://{listener.fileno()}"]
        config.graceful_timeout = GRACEFUL_TIMEOUT_S
        config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")  # one format for all of Compter's log lines
        stop = _stop_on_signals()
        host, port = listener.getsockname()[:2]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        access = "POST and DELETE need the API token" if settings.api_token else "open to all (no COMPTER_API_TOKEN)"
        log.info(
            "compter %s serving on http://%s with store %s; %s", __version__, address, redact(settings.store), access
        )
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)
    finally:
        await store.close()
        telemetry.shutdown()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _worker(settings: Settings, listener: socket.socket) -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        asyncio.run(_serve(settings, listener, _open_store(settings)))
    except StartupError as error:
        log.error("%s", error)
        sys.exit(2)


def _supervise(settings: Settings, listener: socket.socket) -> int:
    """Run `settings.workers` serving processes until they have all exited; the exit code `Workers.wait` gives."""
    context = multiprocessing.get_context("spawn")
    workers = Workers(
        [context.Process(target=_worker, args=(settings, listener), daemon=True) for _ in range(settings.workers)]
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, workers.stop)
    workers.start()
    try:
        return workers.wait()
    finally:
        listener.close()


class Workers:
    """Processes that live and stop together: on a signal, or when one of them dies.

    Once stopping, they have `stop_deadline_s` to exit before they are killed, so that the
    supervisor ends before a service manager's own stop timeout (30 s for systemd and Docker).
    """

    def __init__(self, processes: Sequence[BaseProcess], stop_deadline_s: float = WORKER_STOP_DEADLINE_S) -> None:
        self._processes = processes
        self._stop_deadline_s = stop_deadline_s
        self._stop_by: float | None = None
        self._first_failed: BaseProcess | None = None

    def start(self) -> None:
        for process in self._processes:
            process.start()
        log.info("compter supervising %d workers (pids %s)", len(self._processes), self._pids(self._processes))

    def stop(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        """Ask every worker to stop (a signal handler, hence the arguments)."""
        if self._stop_by is None:
            self._stop_by = time.monotonic() + self._stop_deadline_s
        for process in self._processes:
            # Suppressed: a worker reaped by `wait` just before this handler interrupted it.
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def wait(self) -> int:
        """Until every worker has exited; the exit code of the first that failed, else the highest.

        A worker killed by a signal counts as that signal's number, except the SIGTERM of a stop.
        """
        # One look per round: a second look could find none alive and wait on nothing.
        while alive := [process for process in self._processes if process.is_alive()]:
            if self._stop_by is not None and time.monotonic() >= self._stop_by:
                log.error("workers %s did not stop within %g s: killing them", self._pids(alive), self._stop_deadline_s)
                for process in alive:
                    process.kill()
                    process.join()
                continue
            # A second at most, so that a deadline set by a signal meanwhile is kept.
            wait([process.sentinel for process in alive], timeout=1.0)
            failed = [process for process in self._processes if process.exitcode not in (None, 0)]
            if failed and self._stop_by is None:
                log.error("worker %s exited with %s: stopping the others", failed[0].pid, failed[0].exitcode)
                self._first_failed = failed[0]
                self.stop()
        # The cause, not how the others took being stopped.
        if self._first_failed is not None:
            return abs(self._first_failed.exitcode or 0)
        # A worker still starting has no handler yet, and dies of the SIGTERM it was sent: stopped as asked.
        return max(
            0 if process.exitcode == -signal.SIGTERM else abs(process.exitcode or 0) for process in self._processes
        )

    @staticmethod
    def _pids(processes: Sequence[BaseProcess]) -> str:
        return ", ".join(str(process.pid) for process in processes)


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
