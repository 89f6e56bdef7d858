"""Start `compter serve` as a real process on a free port, for tests that need the real thing."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RunningCompter:
    url: str
    port: int
    process: subprocess.Popen[str]
    log: "tempfile._TemporaryFileWrapper[str]"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15) -> int:
        """Send `sig` and wait for the exit code; a process that does not stop fails the test with its log."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"compter did not stop within {timeout_s} s of {sig!r}:\n{self.output()}") from None

    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        self.log.flush()
        with open(self.log.name) as written:
            return written.read()


def wait_until_serving(running: RunningCompter, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    url, process = running.url, running.process
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"compter exited with {process.returncode} before serving:\n{running.output()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"compter did not serve {url}/healthz within {timeout_s} s")


def spawn_compter(*args: str, env: Mapping[str, str] | None = None, port: int | None = None) -> RunningCompter:
    """Start `compter serve ARGS` on a free port (or `port`) and wait until /healthz answers."""
    port = port or free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "COMPTER_"))}
    environment.update(env or {})
    # A file, not a pipe: a pipe nobody reads would block a chatty server.
    log = tempfile.NamedTemporaryFile("w+", prefix="compter-", suffix=".log")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "compter", "serve", "--port", str(port), *args],
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = RunningCompter(f"http://127.0.0.1:{port}", port, process, log)
    try:
        wait_until_serving(running)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return running


@contextlib.contextmanager
def start_compter(
    *args: str, env: Mapping[str, str] | None = None, port: int | None = None
) -> Iterator[RunningCompter]:
    """`spawn_compter` that always ends the process when the block ends."""
    running = spawn_compter(*args, env=env, port=port)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
        running.process.wait()
        running.log.close()
