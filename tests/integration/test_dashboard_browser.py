"""The dashboard in a real headless Chromium against a running coordinator and real sites."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from coordinator.study_request import parse_study_document, prepare_search
from site_agent.registry import register_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster
from tests.integration.test_tabular_run import _write_csv

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PASSWORD = "dashboard browser test"
STUDY = """name = "browser-study"
dataset = "heart"
task = "tabular"
labels = ["0", "1"]
sites = ["site-a", "site-b"]
trials = 20
lr-min = 0.02
lr-max = 0.2
steps-min = 2
steps-max = 6
batch-size = 4
seed = 1
options = { model = "logistic" }
"""

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason="needs the system Chromium: apt-get install chromium chromium-driver",
    ),
]

if CHROMIUM.is_file():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(flag)
    # The coordinator's certificate is from the consortium CA, which this profile does not know.
    options.accept_insecure_certs = True
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    driver.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()


def _wait(
    check: Callable[[], object], what: str, timeout: float = 60, cluster: Cluster | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if cluster is not None:
            cluster.check_alive()
        time.sleep(0.1)
    raise TimeoutError(f"never saw {what}")


def _shot(driver: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"dashboard-{name}.png"))


def _hop_states(driver: WebDriver) -> list[str]:
    # Read in one script: the live view may replace the rows between two WebDriver calls.
    states: list[str] = driver.execute_script(
        "return Array.from(document.querySelectorAll('tr.hop'), r => r.dataset.status)"
    )
    return states


def _run_status(driver: WebDriver) -> str:
    status: str = driver.execute_script(
        "const e = document.getElementById('run-status'); return e ? e.textContent : ''"
    )
    return status


def _click(driver: WebDriver, element_id: str) -> None:
    driver.find_element(By.ID, element_id).click()


def test_operator_steers_a_tabular_run_live_in_chromium(
    pki: Pki, tmp_path: Path, browser: WebDriver
) -> None:
    sites = list(SITES[:2])
    for index, site in enumerate(sites):
        _write_csv(tmp_path / f"{site}.csv", seed=index, shift=5 * index)
        register_dataset(tmp_path / site, "heart", tmp_path / f"{site}.csv", task_type="tabular")
    plan = {"name": "browser-tabular", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
            "sites": sites, "cycles": 2, "options": {"model": "logistic"},
            "defaults": {"steps": 30, "batch_size": 4, "learning_rate": 0.05}}  # fmt: skip
    bundle = parse_plan(plan).approval_bundle().sha256
    study_bundle = prepare_search(parse_study_document(STUDY)).bundle.sha256
    state_dir = tmp_path / "coordinator"
    (tmp_path / "password").write_text(PASSWORD + "\n")
    added = subprocess.run(
        [sys.executable, "-m", "coordinator", "admin", "add", "olivia", "--role", "operator",
         "--password-file", str(tmp_path / "password"), "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "account olivia (operator) added" in added.stdout
    cluster = Cluster(log_dir=tmp_path / "logs")
    cluster.env.update({  # the coordinator's admin identity for the studies it starts
        "BATON_STUDY_ADMIN_CERTIFICATE": str(pki.directory / "admin.crt"),
        "BATON_STUDY_ADMIN_KEY": str(pki.directory / "admin.key"),
    })  # fmt: skip
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=state_dir, pki_dir=pki.directory, port_file=tmp_path / "port",
            dashboard_port_file=tmp_path / "dashboard.port",
        )  # fmt: skip
        url = f"https://localhost:{(tmp_path / 'dashboard.port').read_text()}"

        def start_site(site: str) -> None:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                               data_dir=tmp_path / site, threads=1,
                               approve=[bundle, study_bundle])  # fmt: skip

        for site in sites:
            start_site(site)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(sites), timeout=120)
            # site-b goes away, so the run waits at hop 1 for it: a deterministic moment to pause.
            cluster.process(sites[1]).stop()

            browser.get(f"{url}/runs")
            assert "/login" in browser.current_url
            _shot(browser, "login")
            browser.find_element(By.NAME, "name").send_keys("olivia")
            browser.find_element(By.NAME, "password").send_keys(PASSWORD)
            browser.find_element(By.CSS_SELECTOR, "form.login button").click()
            # Not the login page's own URL (its ?next= names /runs too): the session is set.
            _wait(
                lambda: (
                    "/login" not in browser.current_url and browser.current_url.endswith("/runs")
                ),
                "the runs page after login",
            )

            browser.get(f"{url}/runs/new")
            browser.find_element(By.ID, "plan").send_keys(json.dumps(plan))
            # site-b is offline: without this the preflight refuses the run, as the CLI does.
            browser.find_element(By.NAME, "allow_offline").click()
            _shot(browser, "new-run")
            browser.find_element(By.CSS_SELECTOR, "form button[type=submit]:not(header *)").click()
            _wait(lambda: "/runs/" in browser.current_url and "new" not in browser.current_url,
                  "the run page")  # fmt: skip
            run_id = browser.current_url.rsplit("/", 1)[1]
            assert _hop_states(browser)[1] == "pending"
            # Hop 0 commits while the page is open: the timeline changes without a reload.
            marker = browser.execute_script("return window.performance.timeOrigin")
            _wait(lambda: _hop_states(browser)[0] == "committed", "hop 0 committed live")
            assert browser.execute_script("return window.performance.timeOrigin") == marker
            _wait(
                lambda: "waiting for site-b to take hop 1" in browser.page_source,
                "the wait for site-b",
            )
            _shot(browser, "run-live")

            _click(browser, "pause")
            _wait(lambda: _run_status(browser) == "paused", "paused")
            assert "paused: the hop in flight is redone on resume" in browser.page_source
            _shot(browser, "run-paused")
            _click(browser, "resume")
            _wait(lambda: _run_status(browser) == "running", "resumed")
            start_site(sites[1])
            _wait(lambda: _hop_states(browser) == ["committed"] * 4, "every hop committed live",
                  timeout=180, cluster=cluster)  # fmt: skip
            _wait(lambda: _run_status(browser) == "completed", "completed")
            assert "<svg" in browser.page_source  # validation curves
            browser.set_window_size(1280, 1450)  # the curves too
            browser.refresh()
            _shot(browser, "run-completed")
            browser.set_window_size(1280, 1000)

            _click(browser, "download")
            archive = browser.downloads / f"baton-{run_id}-adapter.zip"  # type: ignore[attr-defined]
            # Chromium writes a .crdownload and renames it once complete: a whole zip, then.
            _wait(lambda: archive.is_file() and zipfile.is_zipfile(archive), "the adapter download")
            names = {n.rsplit("/", 1)[1] for n in zipfile.ZipFile(archive).namelist()}
            assert {"adapter_model.safetensors", "adapter_config.json"} <= names

            # A study from the New study form; stopped after its trial in flight.
            browser.get(f"{url}/studies")
            _click(browser, "new-study")
            study_text = browser.find_element(By.ID, "study")
            study_text.clear()
            study_text.send_keys(STUDY)
            _shot(browser, "new-study")
            _click(browser, "start-study")
            _wait(lambda: "study browser-study started (worker pid" in browser.page_source,
                  "the study page", cluster=cluster)  # fmt: skip

            def trial_completed() -> bool:
                browser.refresh()
                return "COMPLETE" in browser.page_source

            _wait(trial_completed, "a completed trial", timeout=120, cluster=cluster)
            _click(browser, "stop-study")  # "after the current trial" is the default
            _wait(lambda: "study browser-study stops after its current trial"
                  in browser.page_source, "the stop confirmed")  # fmt: skip

            def worker_stopped() -> bool:
                browser.refresh()
                status = browser.find_element(By.ID, "worker-status").text
                return status.startswith("stopped")

            _wait(worker_stopped, "the worker stopped", timeout=120, cluster=cluster)
            assert "by dashboard:olivia" in browser.find_element(By.ID, "worker-status").text
            browser.set_window_size(1280, 1450)
            _shot(browser, "study")
            browser.set_window_size(1280, 1000)

            browser.get(f"{url}/ledger")
            _click(browser, "verify")
            result = browser.find_element(By.ID, "verify-result").text
            assert result.startswith("ledger verifies:"), result
            _shot(browser, "ledger")
            browser.get(f"{url}/")
            _shot(browser, "overview")
            browser.get(f"{url}/sites")
            _shot(browser, "sites")
            kinds = [(e["kind"], e["payload"].get("by")) for e in _events(state_dir)]
            assert ("run.paused", "dashboard:olivia") in kinds
            assert ("run.running", "dashboard:olivia") in kinds
            assert ("run.created", "dashboard:olivia") in kinds
            assert ("study.started", "dashboard:olivia") in kinds
            assert ("study.stop-requested", "dashboard:olivia") in kinds
    assert shutil.which("true")  # the cluster stopped cleanly (no exception above)


def _events(state_dir: Path) -> list[dict[str, object]]:
    from coordinator.ledger import Ledger

    ledger = Ledger(f"sqlite:///{state_dir / 'ledger.sqlite3'}")
    try:
        return [{"kind": e.kind, "payload": e.payload} for e in ledger.events()]
    finally:
        ledger.close()
