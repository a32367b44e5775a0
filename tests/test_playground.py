"""The playground in a real browser: headless Chromium (Debian's chromium + chromium-driver,
driven by selenium) against `unmask serve --http-port` with the shipped model.

Screenshots for the docs: `UNMASK_PLAYGROUND_SHOTS=docs pytest tests/test_playground.py`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mido
import pytest

from unmask.client import Client

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = os.environ.get("UNMASK_PLAYGROUND_SHOTS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`unmask serve` with the shipped default model, gRPC and HTTP on loopback."""
    grpc_port, http_port = _free_port(), _free_port()
    log = tmp_path_factory.mktemp("playground") / "serve.log"
    env = {**os.environ, "UNMASK_AUTH_TOKENS": "", "UNMASK_MODEL": "", "UNMASK_BROKER_URL": ""}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "unmask", "serve", "--host", "127.0.0.1", "--port",
             str(grpc_port), "--http-port", str(http_port)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"unmask serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"url": url, "grpc": f"127.0.0.1:{grpc_port}"}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium / chromium-driver missing: the set-up installs them")
        pytest.skip("chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--window-size=1280,900",
                 f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser, served, mode: str):
    browser.get(served["url"] + "/")
    browser.find_element("css selector", f"#modes button[data-mode={mode}]").click()
    # every render of the canvas records the step counter and the token states it showed
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => window.seen.push([
            document.getElementById('step').textContent,
            document.querySelectorAll('#canvas .tok.tentative').length,
            document.querySelectorAll('#canvas .tok.committed').length,
        ])).observe(document.getElementById('canvas'), {childList: true});
    """)


def _set(browser, element_id: str, value: str) -> None:
    el = browser.find_element("id", element_id)
    el.clear()
    if value:
        el.send_keys(value)


def _wait_done(browser, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = browser.find_element("id", "status").text
        if status.startswith(("done", "failed")):
            return
        time.sleep(0.1)
    pytest.fail(f"no result after {timeout}s; status {status!r}")


def _shot(browser, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(SHOTS) / name))


def test_the_canvas_denoises_step_by_step_and_ends_with_the_grpc_result(browser, served):
    _open(browser, served, "text")
    prompt = "It was a fine morning, and"
    _set(browser, "prompt", prompt)
    for key, value in (("gen_length", "48"), ("steps", "24"), ("block_length", "8"),
                       ("temperature", "1"), ("seed", "7")):  # fmt: skip
        _set(browser, key, value)
    browser.find_element("id", "go").click()
    _wait_done(browser)
    assert not browser.find_element("id", "error").is_displayed()
    seen = browser.execute_script("return window.seen")
    steps = [int(s) for s, _, _ in seen]
    assert len(set(steps)) >= 12 and steps == sorted(steps), seen  # it changed over time
    assert any(tentative for _, tentative, _ in seen), "no tentative tokens were ever shown"
    committed = [c for _, _, c in seen]
    usage = json.loads(browser.find_element("id", "usage").get_attribute("textContent"))["usage"]
    assert committed[0] < committed[-1] <= 48, committed  # blocks after an EOS are not run
    assert committed[-1] >= int(usage["generated_tokens"]) > 0, (committed, usage)
    shown = browser.find_element("id", "output").text
    with Client(served["grpc"]) as c:
        want = c.generate(prompt, gen_length=48, steps=24, block_length=8, temperature=1.0,
                          seed=7).text  # fmt: skip
    assert shown == want.strip() or shown == want
    # the replay slider goes back to the first step
    browser.execute_script(
        "const r = document.getElementById('replay'); r.value = 0;"
        "r.dispatchEvent(new Event('input'));"
    )
    assert browser.find_element("id", "step").text == "1"
    assert int(browser.find_element("id", "committed").text) < 48
    browser.execute_script(  # half way: committed, tentative and masked side by side
        "const r = document.getElementById('replay'); r.value = Math.floor(r.max / 2);"
        "r.dispatchEvent(new Event('input'));"
    )
    _shot(browser, "playground_text.png")


def test_infill_fills_only_the_gaps(browser, served):
    _open(browser, served, "infill")
    _set(browser, "template", "def add(a, b):\n    return [MASK:4]\n")
    browser.find_element("id", "go").click()
    _wait_done(browser)
    out = browser.find_element("id", "output").text
    assert out.startswith("def add(a, b):\n    return "), out
    assert browser.execute_script("return window.seen.length") >= 1


def test_a_midi_piece_plays_and_downloads_as_a_file_mido_reads(browser, served):
    _open(browser, served, "midi")
    _set(browser, "bars", "2")
    _set(browser, "programs", "0")
    _set(browser, "tempo", "96")
    _set(browser, "gen_length", "64")
    browser.find_element("id", "go").click()
    _wait_done(browser)
    assert not browser.find_element("id", "error").is_displayed()
    assert browser.find_element("id", "download").is_displayed()
    data = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('download').href).then(r => r.arrayBuffer()).then(b => {
            let s = ''; new Uint8Array(b).forEach(x => s += String.fromCharCode(x)); done(btoa(s));
        });
    """)
    midi = mido.MidiFile(file=io.BytesIO(base64.b64decode(data)))
    notes = [m for t in midi.tracks for m in t if m.type == "note_on" and m.velocity > 0]
    assert notes, "the downloaded file has no notes"
    tempos = {
        round(mido.tempo2bpm(m.tempo)) for t in midi.tracks for m in t if m.type == "set_tempo"
    }
    assert tempos == {94}, tempos  # the tempo token nearest 96
    drawn = browser.execute_script("""
        const c = document.getElementById('roll');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i]) n++; return n;
    """)
    assert drawn > 0, "the piano roll is empty"
    browser.find_element("id", "play").click()  # WebAudio: must not throw
    assert not browser.find_element("id", "error").is_displayed()
    _shot(browser, "playground_midi.png")


def test_mistakes_are_shown_to_the_user(browser, served):
    _open(browser, served, "infill")
    _set(browser, "template", "no gap here")
    browser.find_element("id", "go").click()
    box = browser.find_element("id", "error")
    assert box.is_displayed() and "no [MASK:n] gap" in box.text
    _open(browser, served, "text")
    _set(browser, "temperature", "-1")  # refused by the server, field named
    browser.find_element("id", "go").click()
    _wait_done(browser)
    box = browser.find_element("id", "error")
    assert box.is_displayed() and "temperature" in box.text, box.text
