"""deploy/prometheus/alerts.yml in a real Prometheus, scraping a real `compter serve`.

Debian's `prometheus` binary (.ci/install-deploy-tools) runs on a free loopback port with
1-second scrape and evaluation intervals; without it the test skips, except under CI=true.
"""

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.realprocess import RunningCompter, free_port, start_compter
from tests.test_deploy import DEPLOY, dashboard_panels, require_tool

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# Generous for a loaded machine: Compter flags a debt within 1 s, Prometheus adds a scrape and an evaluation.
WAIT_S = 60


class Prometheus:
    """A running Prometheus, read through its HTTP API."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5)
        response.raise_for_status()
        return response.json()["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def alerts(self, name: str, **labels: str) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts of that name whose labels include these."""
        return [
            alert
            for alert in self.api("alerts")["alerts"]
            if alert["labels"]["alertname"] == name and labels.items() <= alert["labels"].items()
        ]

    def unhealthy_rules(self) -> list[str]:
        rules = [rule for group in self.api("rules")["groups"] for rule in group["rules"]]
        assert rules, "no rules loaded"
        return [f"{rule['name']}: {rule.get('lastError')}" for rule in rules if rule["health"] != "ok"]

    def wait_for(self, condition: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            assert time.monotonic() < deadline, f"{what}: not within {WAIT_S} s\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)


@contextlib.contextmanager
def start_prometheus(targets: list[RunningCompter], workdir: Path) -> Iterator[Prometheus]:
    """Prometheus scraping each target's /metrics every second, with alerts.yml evaluated every second."""
    binary = require_tool("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "compter", "static_configs": [{"targets": [f"127.0.0.1:{target.port}" for target in targets]}]}
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port, log = free_port(), workdir / "prometheus.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", log)
    try:
        prometheus.wait_for(lambda: _ready(prometheus, process), "Prometheus ready")
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(prometheus: Prometheus, process: "subprocess.Popen[bytes]") -> bool:
    assert process.poll() is None, f"prometheus exited with {process.returncode}:\n{prometheus.log.read_text()}"
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{prometheus.url}/-/ready", timeout=1).status_code == 200
    return False


def miss_a_deadline_then_pay(prometheus: Prometheus, first: RunningCompter, second: RunningCompter) -> None:
    """Create a debt through `first`, let it fall overdue, pay it through `second`; the alert follows."""
    created = httpx.post(f"{first.url}/debts", json={"name": "e2e-backup", "interval": "1h"})
    assert created.status_code == 201
    debt = {"compter_debt_id": str(created.json()["id"]), "compter_debt_name": "e2e-backup"}
    selector = ",".join(f'{label}="{value}"' for label, value in debt.items())

    # Scraped and evaluated, and not due: silent.
    prometheus.wait_for(
        lambda: (
            [series["value"][1] for series in prometheus.query(f"max(compter_debt_overdue{{{selector}}})")] == ["0"]
        ),
        "compter_debt_overdue = 0 scraped",
    )
    silent_until = time.monotonic() + 3  # a few evaluations of that series
    while time.monotonic() < silent_until:
        assert prometheus.alerts("CompterDebtOverdue", **debt) == []
        time.sleep(0.2)
    assert prometheus.query("compter_debt_count"), "CompterNotExporting relies on compter_debt_count"

    # A payment that shortens the interval to 1 s; the next one is missed. One alert, however many replicas.
    assert httpx.post(f"{first.url}/debts/{debt['compter_debt_id']}", json={"interval": 1}).status_code == 200
    prometheus.wait_for(
        lambda: [alert["state"] for alert in prometheus.alerts("CompterDebtOverdue", **debt)] == ["firing"],
        "CompterDebtOverdue firing",
    )
    (alert,) = prometheus.alerts("CompterDebtOverdue", **debt)
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == f"Debt e2e-backup (id {debt['compter_debt_id']}) is overdue"
    overdue_panel = [series["compter_debt_id"] for series in dashboard_panel_series("Overdue debts", prometheus)]
    assert overdue_panel == [alert["labels"]["compter_debt_id"]]

    # Paid through the other replica, with its interval back to an hour: the alert resolves.
    paid = httpx.post(f"{second.url}/debts/{debt['compter_debt_id']}", json={"interval": "1h"})
    assert paid.json()["status"] == "ok"
    prometheus.wait_for(lambda: prometheus.alerts("CompterDebtOverdue", **debt) == [], "CompterDebtOverdue resolved")

    # Counters are per process: their sum is every payment, as the rules and the dashboard assume.
    prometheus.wait_for(
        lambda: [s["value"][1] for s in prometheus.query(f"sum(compter_payments_total{{{selector}}})")] == ["2"],
        "both payments counted once",
    )
    # Every rule evaluated against Compter's real series without an error, and none fires.
    assert prometheus.unhealthy_rules() == []
    assert [alert["labels"]["alertname"] for alert in prometheus.api("alerts")["alerts"]] == []


def dashboard_panel_series(title: str, prometheus: Prometheus) -> list[dict[str, str]]:
    """The label sets a dashboard panel's queries return now, every panel's queries having run without error."""
    shown: dict[str, list[dict[str, str]]] = {}
    for panel in dashboard_panels():
        shown[panel["title"]] = []
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$debt", ".*")
            shown[panel["title"]] += [series["metric"] for series in prometheus.query(expr)]
    return shown[title]


def test_a_missed_deadline_fires_the_overdue_alert_and_a_payment_resolves_it(tmp_path: Path) -> None:
    with start_compter() as compter, start_prometheus([compter], tmp_path) as prometheus:
        miss_a_deadline_then_pay(prometheus, compter, compter)


def test_a_fleet_on_a_shared_store_raises_one_alert_per_debt(shared_store_url: str, tmp_path: Path) -> None:
    with (
        start_compter("--store", shared_store_url) as one,
        start_compter("--store", shared_store_url) as two,
        start_prometheus([one, two], tmp_path) as prometheus,
    ):
        miss_a_deadline_then_pay(prometheus, one, two)


def test_overdue_debts_past_the_series_cap_are_still_alerted_on(tmp_path: Path) -> None:
    with (
        start_compter(env={"COMPTER_METRICS_MAX_DEBTS": "1"}) as compter,
        start_prometheus([compter], tmp_path) as prometheus,
    ):
        ids = [
            str(httpx.post(f"{compter.url}/debts", json={"name": f"capped-{n}", "interval": 1}).json()["id"])
            for n in range(2)
        ]

        def overdue_ids() -> list[str]:
            return [alert["labels"]["compter_debt_id"] for alert in prometheus.alerts("CompterDebtOverdue")]

        prometheus.wait_for(lambda: overdue_ids() == ids[:1], "CompterDebtOverdue for the debt with series, only")

        def unnamed() -> list[tuple[str, float]]:
            alerts = prometheus.alerts("CompterOverdueDebtsWithoutSeries")
            return [(alert["state"], float(alert["value"])) for alert in alerts]

        # Pending, not firing: the rule waits 2 minutes, longer than this test.
        prometheus.wait_for(lambda: unnamed() == [("pending", 1.0)], "the debt past the cap is counted")
        assert httpx.post(f"{compter.url}/debts/{ids[1]}", json={"interval": "1h"}).json()["status"] == "ok"
        prometheus.wait_for(lambda: unnamed() == [], "its payment clears the alert")
        assert prometheus.unhealthy_rules() == []
