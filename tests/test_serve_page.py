"""The chat page in a real headless browser: Debian's chromium and chromedriver driven by selenium.

`make test` installs chromium and chromium-driver when they are missing and it can (root with
apt-get); elsewhere this module is skipped with that reason.
"""

from __future__ import annotations

import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium: pip install 'xiaolm[dev]'")
httpx = pytest.importorskip("httpx")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed (`make test` installs them when run as root "
                "with apt-get)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from serve_helpers import run_server, serving_checkpoint  # noqa: E402

# the flags Chromium needs on a machine with no network and no display (as root: no sandbox)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,800"]
WAIT_SECONDS = 120  # an upper bound for a loaded machine, not a timing assertion


def start_browser(profile_dir):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def page(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("page")
    checkpoint = serving_checkpoint(root / "tiny", tokenizer, max_seq_len=1024)
    with run_server(checkpoint, model_name="tiny", num_slots=2, max_tokens=1000) as served:
        driver = start_browser(root / "profile")
        try:
            driver.get(served.url + "/")
            wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
            yield driver, served
        finally:
            driver.quit()


def wait(driver, condition):
    return WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.05).until(condition)


def set_control(driver, element_id, value):
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input'));", element_id, str(value))


def record_streaming(driver):
    """Record the text of the newest assistant message at every change the page makes to it."""
    driver.execute_script("""
        window.snapshots = [];
        new MutationObserver(() => {
            const bubbles = document.querySelectorAll('.message.assistant');
            if (bubbles.length) window.snapshots.push(bubbles[bubbles.length - 1].textContent);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")


def send(driver, text):
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def last_state(driver):
    return driver.execute_script("const b = document.querySelectorAll('.message.assistant');"
                                 "return b.length ? b[b.length - 1].dataset.state : null")


def api_answer(served, messages, max_tokens, **sampling):
    reply = httpx.post(served.url + "/v1/chat/completions", timeout=WAIT_SECONDS, json={
        "model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0, **sampling}).json()
    return reply["choices"][0]["message"]["content"], reply["choices"][0]["finish_reason"]


def test_chat_page_streams_turns_stops_and_clears(page, tmp_path):
    driver, served = page
    sampling = dict(temperature=1.0, top_p=0.9, seed=5)  # seeded: the API gives the same answer
    set_control(driver, "temperature", 1)
    set_control(driver, "top-p", 0.9)
    set_control(driver, "seed", 5)
    set_control(driver, "max-tokens", 40)
    set_control(driver, "system", "你是小模型。")

    # first turn: the answer appears piece by piece, and is what the API answers
    record_streaming(driver)
    send(driver, "你好，请介绍一下三国。")
    wait(driver, lambda d: last_state(d) == "done")
    snapshots = [s for s in driver.execute_script("return window.snapshots") if s]
    history = driver.execute_script("return state.history")
    first = [{"role": "system", "content": "你是小模型。"}, {"role": "user", "content": "你好，请介绍一下三国。"}]
    assert history[1]["content"] == api_answer(served, first, 40, **sampling)[0]
    assert len(set(snapshots)) >= 5  # many renders while it streamed, not one at the end

    # second turn: the history goes with it
    send(driver, "Who are you?")
    wait(driver, lambda d: last_state(d) == "done")
    history = driver.execute_script("return state.history")
    second = first + [history[1], {"role": "user", "content": "Who are you?"}]
    assert len(history) == 4 and history[3]["content"] == api_answer(served, second, 40, **sampling)[0]
    driver.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # clear, then stop a long answer mid-way: the server frees the request's slot
    driver.find_element(By.ID, "clear").click()
    assert driver.find_elements(By.CSS_SELECTOR, ".message") == [] and driver.execute_script(
        "return state.history.length") == 0
    candidates = ["写一首很长的诗。", "Tell me a long story.", "三国演义第一回", "1 2 3 4 5"]
    question = next(q for q in candidates
                    if api_answer(served, [{"role": "system", "content": "你是小模型。"},
                                           {"role": "user", "content": q}], 900)[1] == "length")
    set_control(driver, "temperature", 0)
    set_control(driver, "max-tokens", 900)
    send(driver, question)
    wait(driver, lambda d: httpx.get(served.url + "/health").json()["num_running"] == 1)
    driver.find_element(By.ID, "stop").click()
    wait(driver, lambda d: last_state(d) == "stopped")
    wait(driver, lambda d: httpx.get(served.url + "/health").json()["num_running"] == 0)
    partial = driver.execute_script("return state.history[1].content")
    assert 0 < len(served.server.tokenizer.encode(partial)) < 900


def test_model_output_is_rendered_as_text_never_as_html(page):
    driver, _ = page
    rendered = driver.execute_script("""
        const node = document.createElement('div');
        renderMarkdown(node, '<img src=x onerror="window.injected=1"> **粗体** and `code`\\n\\n- 一\\n- 二\\n\\n'
                             + '```python\\nprint("<b>hi</b>")\\n```\\n三国');
        document.body.appendChild(node);
        return {html: node.innerHTML, img: node.querySelectorAll('img').length, strong: node.querySelector('strong').textContent,
                items: node.querySelectorAll('li').length, code: node.querySelector('pre code').textContent,
                injected: window.injected === 1};""")
    assert rendered["img"] == 0 and not rendered["injected"] and "&lt;img" in rendered["html"]
    assert rendered["strong"] == "粗体" and rendered["items"] == 2 and rendered["code"] == 'print("<b>hi</b>")'
