"""The operators' dashboard in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by Selenium against a running `tandem up`.

Run by tools/e2e/run after test_openai.py, with TANDEM_URL (the /v1 base URL), TANDEM_ADMIN_KEY,
TANDEM_DATA (the `reverse` data set) and SCREENSHOTS (where the page's screenshots go). It signs
in, sees the worker, submits a fine-tuning job through the API, watches the job's loss curve get
new points on the page, cancels the job from the page, checks the job's state through the API,
and drains and resumes the worker from the page. Each screenshot is checked not to be blank.
"""

import os
import shutil
import sys
import time
from pathlib import Path

import openai
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from test_openai import http, ok

URL = os.environ["TANDEM_URL"].rstrip("/")
ROOT = URL.removesuffix("/v1")
ADMIN_KEY = os.environ["TANDEM_ADMIN_KEY"]
DATA = Path(os.environ.get("TANDEM_DATA", "data/reverse"))
SHOTS = Path(os.environ.get("SCREENSHOTS", "target/dashboard-screenshots"))
BASE = "small"


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1440,1500"):
        options.add_argument(arg)
    # The Debian driver, never one Selenium Manager would download.
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(options=options, service=service)


def wait(driver, what, predicate, seconds=60):
    """Waits until predicate(driver) is truthy (retrying over re-rendered elements); returns it."""

    def check(d):
        try:
            return predicate(d)
        except StaleElementReferenceException:
            return False

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.25).until(check)
    except TimeoutException:
        raise AssertionError(f"timed out after {seconds} s waiting for {what}") from None


def click(driver, what, selector):
    """Clicks the element at selector, finding it again if the page re-rendered it in between."""

    def attempt(d):
        d.find_element(By.CSS_SELECTOR, selector).click()
        return True

    wait(driver, what, attempt, seconds=10)


def shot(driver, name):
    """Saves a screenshot of the whole page and checks that it is not blank: a page that did not
    render is one flat colour."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"dashboard-{name}.png"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1440, max(900, min(height + 40, 4000)))
    driver.save_screenshot(str(path))
    image = Image.open(path).convert("L")
    counts = image.getcolors(maxcolors=256) or []
    drawn = 1 - max(n for n, _ in counts) / (image.size[0] * image.size[1])
    assert len(counts) > 20 and drawn > 0.01, f"{path} looks blank: {len(counts)} grey levels, {drawn:.2%} drawn"
    ok(f"screenshot {path} ({image.size[0]}x{image.size[1]}, {len(counts)} grey levels, {drawn:.1%} off the background)")


def cell(row, index):
    return row.find_elements(By.TAG_NAME, "td")[index].text


def main():
    driver = browser()
    try:
        run(driver)
    finally:
        driver.quit()


def run(driver):
    # a. The page asks for the key; a wrong one is refused, the operator's signs in.
    driver.get(ROOT + "/dashboard")
    assert driver.find_element(By.ID, "login").is_displayed(), "the sign-in form is not shown"
    shot(driver, "sign-in")
    driver.find_element(By.ID, "key").send_keys("not-the-key")
    driver.find_element(By.ID, "sign-in").click()
    wait(driver, "the wrong key's refusal", lambda d: "not the operator" in d.find_element(By.ID, "login-error").text)
    key_input = driver.find_element(By.ID, "key")
    key_input.clear()
    key_input.send_keys(ADMIN_KEY)
    driver.find_element(By.ID, "sign-in").click()
    wait(driver, "the dashboard", lambda d: d.find_element(By.ID, "app").is_displayed())
    ok("signed in with the operator's key (a wrong key was refused)")

    # b. The worker, alive, with its lease and its engine's figures; the leader coordinator.
    row = wait(driver, "an alive worker", lambda d: next(
        (r for r in d.find_elements(By.CSS_SELECTOR, "#workers tr[data-worker]") if "alive" in cell(r, 1)), None))
    worker = row.get_attribute("data-worker")
    wait(driver, "the worker's page pool", lambda d: "/" in cell(d.find_element(By.CSS_SELECTOR, f'tr[data-worker="{worker}"]'), 6))
    leader = wait(driver, "the leader coordinator", lambda d: next(
        (r.text for r in d.find_elements(By.CSS_SELECTOR, "#coordinators tr[data-coordinator]") if "leader" in r.text), None))
    ok(f"worker {worker} is alive on the page; coordinator: {leader!r}")

    # c. A tenant submits a fine-tuning job through the API (long enough to watch and cancel).
    status, made = http("POST", "/admin/api-keys", {"tenant": "dashboard"}, key=ADMIN_KEY)
    assert status == 200, made
    tenant = openai.OpenAI(base_url=URL, api_key=made["key"], max_retries=0, timeout=60)
    with open(DATA / "train.jsonl", "rb") as f:
        file = tenant.files.create(file=f, purpose="fine-tune")
    job = tenant.fine_tuning.jobs.create(
        model=BASE, training_file=file.id, seed=0, hyperparameters={"n_epochs": 20, "batch_size": 4}
    )
    ok(f"submitted job {job.id}")
    # Some traffic for the charts meanwhile.
    for _ in range(4):
        tenant.completions.create(model=BASE, prompt="Hello", max_tokens=8, temperature=0)

    # d. Its loss curve gets new points on the page.
    def points(d):
        curve = d.find_element(By.CSS_SELECTOR, f'#jobs tr[data-job="{job.id}"] svg.loss')
        return int(curve.get_attribute("data-points") or 0)

    first = wait(driver, "the job's first loss points", lambda d: points(d) >= 2 and points(d), seconds=300)
    later = wait(driver, "more loss points", lambda d: points(d) > first and points(d), seconds=300)
    row = wait(driver, "the running job's row", lambda d: "running" in (
        t := d.find_element(By.CSS_SELECTOR, f'#jobs tr[data-job="{job.id}"]').text) and t)
    ok(f"the loss curve grew from {first} to {later} points; row: {row!r}")
    wait(driver, "a requests chart point", lambda d: int(d.find_element(
        By.CSS_SELECTOR, '[data-series="requests_per_second"] svg').get_attribute("data-points") or 0) >= 1, seconds=30)
    shot(driver, "training")

    # e. Cancel it from the page (after the confirmation), then the API says cancelled.
    click(driver, "the job's cancel button", f'#jobs tr[data-job="{job.id}"] button.cancel')
    alert = wait(driver, "the confirmation", lambda d: d.switch_to.alert)
    assert job.id in alert.text, alert.text
    alert.accept()
    deadline = time.monotonic() + 60
    while (job := tenant.fine_tuning.jobs.retrieve(job.id)).status != "cancelled":
        assert time.monotonic() < deadline, f"job still {job.status} 60 s after the cancel"
        time.sleep(0.5)
    wait(driver, "the cancelled job on the page", lambda d: d.find_element(
        By.CSS_SELECTOR, f'#jobs tr[data-job="{job.id}"]').get_attribute("data-status") == "cancelled")
    ok(f"cancelled {job.id} from the page; the API says {job.status}")

    # f. Drain the worker from the page (a request then finds no worker), and resume it.
    def worker_row(d):
        return d.find_element(By.CSS_SELECTOR, f'#workers tr[data-worker="{worker}"]')

    click(driver, "the drain button", f'#workers tr[data-worker="{worker}"] button.drain')
    wait(driver, "the drain confirmation", lambda d: d.switch_to.alert).accept()
    wait(driver, "the draining worker", lambda d: "draining" in cell(worker_row(d), 1))
    status, refused = http("POST", "/completions", {"model": BASE, "prompt": "Hi", "max_tokens": 2}, key=made["key"])
    assert status == 503, f"a drained cluster answered {status}: {refused}"
    shot(driver, "drained")
    click(driver, "the resume button", f'#workers tr[data-worker="{worker}"] button.resume')
    wait(driver, "the resume confirmation", lambda d: d.switch_to.alert).accept()
    wait(driver, "the worker back in service", lambda d: "alive" in cell(worker_row(d), 1))
    r = tenant.completions.create(model=BASE, prompt="Hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1, r
    ok(f"drained {worker} from the page (requests got 503), and put it back in service")

    # g. Revoke the tenant's key from the page: the API refuses it then.
    key_id = made["id"]
    click(driver, "the key's revoke button", f'#keys tr[data-key="{key_id}"] button.revoke')
    wait(driver, "the revoke confirmation", lambda d: d.switch_to.alert).accept()
    wait(driver, "the key gone from the page", lambda d: not d.find_elements(By.CSS_SELECTOR, f'#keys tr[data-key="{key_id}"]'))
    status, _ = http("GET", "/models", key=made["key"])
    assert status == 401, f"a revoked key got {status}"
    shot(driver, "overview")
    ok("revoked the tenant's key from the page; the API refuses it")

    # h. Events list the job's cancellation.
    wait(driver, "the job's cancellation among the events", lambda d: "cancel" in d.find_element(By.ID, "events").text.lower())
    ok("the events list the cancellation")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        sys.exit(1)
    ok("dashboard test passed")
