"""`compter serve` as a real process on a real port."""

import http.client
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from compter import __version__
from tests.realprocess import free_port, start_compter


def compter(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("COMPTER_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "compter", *args], capture_output=True, text=True, env=environment, timeout=30
    )


def poll_status(url: str, want: str, timeout_s: float) -> float:
    started = time.monotonic()
    while (status := httpx.get(url).json()["status"]) != want:
        assert time.monotonic() - started < timeout_s, f"still {status} after {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_serves_a_debt_that_is_paid_goes_overdue_and_recovers_then_stops_on_sigterm() -> None:
    with start_compter() as server:
        created = httpx.post(f"{server.url}/debts", json={"name": "nightly", "interval": 1})
        assert created.status_code == 201
        debt_url = server.url + created.headers["Location"]
        paid = httpx.post(debt_url)
        assert (paid.status_code, paid.json()["payments"], paid.json()["status"]) == (200, 1, "ok")
        # No request arrives until the watcher must have noticed (deadline 1 s after the payment).
        poll_status(debt_url, "overdue", timeout_s=2.5)
        recovered = httpx.post(debt_url)
        assert (recovered.status_code, recovered.json()["status"], recovered.json()["payments"]) == (200, "ok", 2)
        assert server.stop(signal.SIGTERM) == 0
        assert "Traceback" not in server.output()


def test_answers_without_a_body_carry_no_content_type() -> None:
    """Quart's test client adds text/html to any response without one: only a real server shows this."""
    with start_compter() as server, httpx.Client(base_url=server.url) as http:
        path = http.post("/debts").headers["Location"]
        for response in (http.options(path), http.delete(path)):
            assert response.status_code == 204
            assert "content-type" not in response.headers, response.headers


def test_an_idle_kept_alive_connection_outlives_a_clients_own_keep_alive() -> None:
    """A server that closed idle connections when httpx does (5 s) would race clients sending on them."""
    with start_compter() as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            for pause_s in (0, 6):
                time.sleep(pause_s)
                connection.request("GET", "/healthz")  # on the same socket: http.client never reconnects by itself
                response = connection.getresponse()
                assert (response.status, response.read()) == (200, b'{"status":"ok"}')
        finally:
            connection.close()


def test_sigint_stops_it_cleanly_too() -> None:
    with start_compter() as server:
        assert server.stop(signal.SIGINT) == 0


def test_sigterm_lets_a_request_in_flight_finish() -> None:
    with start_compter() as server:
        body = b'{"interval": 60, "name": "in-flight"}'
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
            connection.sendall(
                b"POST /debts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:10]
            )
            time.sleep(0.2)  # the request is being read when the signal arrives
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            connection.sendall(body[10:])
            received = b""
            while b"}" not in received and (chunk := connection.recv(65536)):
                received += chunk
            answer = received.decode()
        assert answer.startswith("HTTP/1.1 201")
        assert '"in-flight"' in answer
        assert server.process.wait(15) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/healthz")


def test_environment_configures_it_and_flags_win() -> None:
    port = free_port()
    with start_compter(env={"COMPTER_PORT": "not-a-port", "COMPTER_HOST": "127.0.0.1"}, port=port) as server:
        assert httpx.get(f"{server.url}/healthz").status_code == 200


@pytest.mark.parametrize(
    ("args", "env", "mentions"),
    [
        (["serve", "--port", "abc"], {}, "--port"),
        (["serve", "--port", "70000"], {}, "--port"),
        (["serve"], {"COMPTER_PORT": "eighty"}, "COMPTER_PORT"),
        (["serve", "--store", "mysql://db"], {}, "mysql://db"),
        (["serve", "--store", "nonsense"], {}, "nonsense"),
        (["serve"], {"COMPTER_STORE": "ftp://x"}, "ftp://x"),
        (["serve", "--store", "postgresql://u:pw@127.0.0.1:abc/x"], {}, "PostgreSQL URL is not valid"),
        (["serve", "--store", "postgresql://u:pw@127.0.0.1:99999/x"], {}, "u:***@127.0.0.1:99999"),
        (["serve", "--store", "redis://127.0.0.1:abc/0"], {}, "redis store URL"),
        (["serve", "--store", "redis://127.0.0.1:6379/abc"], {}, "a database number"),
        (["serve", "--store", "redis://127.0.0.1:6379/1/2"], {}, "a database number"),
        (["serve", "--store", "memory://x"], {}, "nothing after memory://"),
        (["serve", "--bogus"], {}, "--bogus"),
        (["serve", "--host", ""], {}, "--host is empty"),
        (["serve"], {"COMPTER_HOST": " "}, "COMPTER_HOST is empty"),
        (["frobnicate"], {}, "frobnicate"),
    ],
)
def test_bad_settings_are_one_line_on_stderr_and_exit_2(args: list[str], env: dict[str, str], mentions: str) -> None:
    result = compter(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert mentions in lines[0]
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = compter("serve", "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_store_is_named_before_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = compter("serve", "--port", str(taken.getsockname()[1]), "--store", "mysql://db")
    assert result.returncode == 2
    assert "mysql://db" in result.stderr


def test_version_and_help() -> None:
    version = compter("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"compter, version {__version__}")
    serve_help = compter("serve", "--help")
    assert serve_help.returncode == 0
    for flag in ("--host", "--port", "--store", "COMPTER_STORE", "default memory://"):
        assert flag in serve_help.stdout
