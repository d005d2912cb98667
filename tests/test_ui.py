"""The web page at `/`: served from the package with nothing from elsewhere, and in a real headless Chromium
it shows exactly what `POST /v1/score` answers (rewards, first step below the threshold, best of N, errors)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import API_KEY, ServerProcess
from prmserve import cli

ROOT = Path(__file__).resolve().parents[1]
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1100,1700"]
PRINTED = 0.5e-4 + 1e-9  # the page prints 4 decimals
AGGREGATIONS = ("min", "last", "mean", "prod")
PROBLEM = "Tom has 3 apples and buys 2 more. How many apples does he have?"
SOLUTIONS = "3 + 2 = 5.\n\nHe has 5 apples.\n---\n3 + 2 = 6.\n\nSo he has 6.\n\nThe answer is 6.\n---\n2 + 3 = 5.\n\n5 apples."
EDITED = "3 + 2 = 7."  # typed over candidate 2's first step in the step editor
ASSET = re.compile(r'(?:src|href)="([^"]+)"')


def score(server: ServerProcess, items: list[dict], aggregate: str = "min", key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/score", json={"items": items, "aggregate": aggregate}, headers=headers, timeout=60)


def test_the_page_and_its_assets_come_from_the_server_alone(server: ServerProcess, slow_server: ServerProcess) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = [a for a in ASSET.findall(page.text) if a != "docs"]
    assert sorted(assets) == ["ui-assets/ui.css", "ui-assets/ui.js"]
    for text in [page.text, *(httpx.get(f"{server.url}/{a}").raise_for_status().text for a in assets)]:
        assert not re.search(r"https?://", text), "the page must work offline"
    assert httpx.get(slow_server.url + "/").status_code == 200  # open without the API key; scoring is not
    assert "/" not in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_the_wheel_carries_the_page(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="builds the wheel with this environment's setuptools (no download)")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    names = zipfile.ZipFile(next(tmp_path.glob("prmserve-*.whl"))).namelist()
    assert {f"prmserve/server/static/ui/{n}" for n in ("index.html", "ui.js", "ui.css")} <= set(names)


@pytest.mark.parametrize("flags, opened", [([], True), (["--no-browser"], False)])
def test_prmserve_ui_serves_and_opens_the_page_once_listening(monkeypatch: pytest.MonkeyPatch, flags: list[str], opened: bool) -> None:
    urls: list[str] = []
    browser_called = threading.Event()
    monkeypatch.setattr("webbrowser.open", lambda url: (urls.append(url), browser_called.set()))

    def serve(args) -> int:  # stands in for run_serve: listens a moment as uvicorn would after the model loads
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", args.port))
            listener.listen()
            browser_called.wait(5 if opened else 0.5)
        return 0

    monkeypatch.setattr("prmserve.cli.ui.run_serve", serve)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["ui", "--host", "0.0.0.0", "--port", str(port), *flags]) == 0
    assert urls == ([f"http://127.0.0.1:{port}/"] if opened else [])


# In Chromium --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    if not Path(CHROMEDRIVER).exists():
        pytest.skip(f"no {CHROMEDRIVER}: install Debian's chromium and chromium-driver (.ci/run does) to run the browser tests")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 30, poll_frequency=0.1).until(lambda d: condition(d), message=f"page: {what}")


def css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def type_into(driver, selector: str, text: str) -> None:
    field = css(driver, selector)[0]
    field.clear()
    field.send_keys(text)


def click_score(driver) -> None:
    """Click Score and wait for the answer: results or an error."""
    css(driver, "#score")[0].click()
    wait(driver, lambda d: css(d, "#score")[0].is_enabled() and (css(d, ".result") or css(d, "#error")[0].is_displayed()),
         "an answer to Score")


def shown_error(driver) -> str:
    return css(driver, "#error")[0].text if css(driver, "#error")[0].is_displayed() else ""


def test_scoring_in_the_page_shows_what_the_api_answers(browser, server: ServerProcess, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    wait(browser, lambda d: css(d, "#model")[0].text, "the model's name from /health")
    type_into(browser, "#problem", PROBLEM)
    type_into(browser, "#solutions", SOLUTIONS)
    candidates = [[s.get_attribute("value") for s in css(box, ".step-input")] for box in css(browser, ".candidate")]
    assert candidates == [["3 + 2 = 5.", "He has 5 apples."], ["3 + 2 = 6.", "So he has 6.", "The answer is 6."], ["2 + 3 = 5.", "5 apples."]]

    # an empty step added in the editor: the server's 400 is shown as its own message
    css(css(browser, ".candidate")[0], "button")[-1].click()  # "+ step"
    refused = score(server, [{"problem": PROBLEM, "steps": [*candidates[0], ""]}, *({"problem": PROBLEM, "steps": c} for c in candidates[1:])])
    assert refused.status_code in (400, 422)
    click_score(browser)
    assert shown_error(browser) == f"{refused.status_code}: {refused.json()['error']['message']}"
    assert not css(browser, ".result")
    css(css(browser, ".candidate")[0], "li button")[-1].click()  # "×" on the empty step

    type_into(browser, ".candidate:nth-of-type(2) li:first-child .step-input", EDITED)
    candidates[1][0] = EDITED
    items = [{"problem": PROBLEM, "steps": steps} for steps in candidates]
    answers = {m: score(server, items, m).raise_for_status().json()["results"] for m in AGGREGATIONS}
    rewards = [r["step_rewards"] for r in answers["min"]]
    ordered = sorted({r for rs in rewards for r in rs})
    threshold = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # between two rewards: no rounding at the edge
    type_into(browser, "#threshold", repr(threshold))
    Select(css(browser, "#aggregation")[0]).select_by_value("mean")
    click_score(browser)
    assert shown_error(browser) == ""

    results = css(browser, ".result")
    assert len(results) == len(candidates)
    for result, steps, expected, c in zip(results, candidates, rewards, range(len(candidates))):
        shown = [float(r.text) for r in css(result, ".step .reward")]
        assert [s.text for s in css(result, ".step .text")] == steps
        assert shown == pytest.approx(expected, abs=PRINTED)
        below = next((i for i, r in enumerate(expected) if r < threshold), None)
        marked = [i for i, step in enumerate(css(result, ".step")) if "first-below" in step.get_attribute("class")]
        assert marked == ([] if below is None else [below])
        if below is not None:
            assert css(result, ".step.first-below .mark")[0].text == f"first below {threshold}"
        for method in AGGREGATIONS:
            printed = css(result, f'.aggregate[data-method="{method}"] .value')[0].text
            assert float(printed) == pytest.approx(answers[method][c]["aggregate"], abs=PRINTED)
    means = [r["aggregate"] for r in answers["mean"]]
    best = means.index(max(means))
    assert [i for i, r in enumerate(results) if "best" in r.get_attribute("class").split()] == [best]
    assert css(results[best], ".best-mark")[0].text == f"best of {len(candidates)} by mean"
    assert {m for m in means if m < max(means)}, "the candidates should differ, or the pick shows nothing"

    scored_file_in_a_sortable_table(browser, server, tmp_path)
    browser.set_window_size(1100, browser.execute_script("return document.body.scrollHeight") + 100)
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(tmp_path / "ui.png"))
    print(f"screenshot: {tmp_path / 'ui.png'}")


def scored_file_in_a_sortable_table(browser, server: ServerProcess, tmp_path: Path) -> None:
    """A JSONL upload: one row per item, its aggregates as the API computes them; headers sort the rows."""
    records = [
        {"id": "a", "problem": "What is 2 + 2?", "steps": ["2 + 2 = 4.", "The answer is 4."]},
        {"problem": "What is 7 - 3?", "completion": "7 - 3 = 5.\n\nSo 5.\n\nThe answer is 5."},
        {"problem": "What is 3 * 3?", "steps": ["3 * 3 = 9."]},
    ]
    upload = tmp_path / "items.jsonl"
    upload.write_text(json.dumps(records[0]) + "\n\n" + "\n".join(map(json.dumps, records[1:])) + "\n")
    fields = [{k: v for k, v in r.items() if k != "id"} for r in records]
    expected = {line: r for line, r in zip((1, 3, 4), score(server, fields).raise_for_status().json()["results"])}
    css(browser, "#jsonl")[0].send_keys(str(upload))
    wait(browser, lambda d: len(css(d, "#table tbody tr")) == len(records), "the table's rows")
    assert shown_error(browser) == ""
    headers = [th.text for th in css(browser, "#table th")]

    def column(name: str) -> list[str]:
        index = headers.index(name)
        return [row.find_elements("css selector", "td")[index].text for row in css(browser, "#table tbody tr")]

    assert [int(x) for x in column("line")] == [1, 3, 4]
    for line, printed in zip((1, 3, 4), column("min")):
        assert float(printed) == pytest.approx(expected[line]["aggregate"], abs=PRINTED)
        assert len(expected[line]["step_rewards"]) == int(column("steps")[[1, 3, 4].index(line)])
    min_header = css(browser, '#table th[data-key="min"]')[0]
    min_header.click()
    lines = sorted(expected, key=lambda line: (expected[line]["aggregate"], line))
    assert [int(x) for x in column("line")] == lines
    min_header.click()
    assert [float(x) for x in column("min")] == sorted((float(x) for x in column("min")), reverse=True)
    assert min_header.get_attribute("aria-sort") == "descending"


def test_the_api_key_field_is_sent_and_a_401_shows_the_servers_message(browser, slow_server: ServerProcess) -> None:
    browser.get(slow_server.url + "/")
    type_into(browser, "#problem", "What is 1 + 1?")
    type_into(browser, "#solutions", "1 + 1 = 2.")
    refused = score(slow_server, [{"problem": "What is 1 + 1?", "steps": ["1 + 1 = 2."]}])
    assert refused.status_code == 401
    click_score(browser)
    assert shown_error(browser) == f"401: {refused.json()['error']['message']}"
    type_into(browser, "#api-key", API_KEY)
    click_score(browser)
    assert shown_error(browser) == ""
    expected = score(slow_server, [{"problem": "What is 1 + 1?", "steps": ["1 + 1 = 2."]}], key=API_KEY).json()["results"][0]
    assert float(css(browser, ".step .reward")[0].text) == pytest.approx(expected["step_rewards"][0], abs=PRINTED)
