"""The chat page: served self-contained, its streaming client (the page's own chat.js, run by Node)
reassembles the server's answer and stops it on request, and in headless Chromium a message sent
on the page shows the streamed reply. Browser and Node tests skip, with the reason, where those
programs are missing."""

import json
import shutil
import subprocess
import time
from importlib import resources

import httpx
import openai
import pytest
from helpers import LiveServer
from test_serve import PLAIN_CONVERSATION, trained_engine

from llmkit.serve.app import create_app
from llmkit.serve.server import ServeConfig

MODEL = "tiny"
STATIC = resources.files("llmkit.serve") / "static"
NODE_CLIENT = """
const {streamChat} = require(process.argv[1]);
const [url, body, abortAfter] = [process.argv[2], JSON.parse(process.argv[3]), Number(process.argv[4])];
const controller = new AbortController();
const pieces = [];
streamChat({baseUrl: url, body, signal: controller.signal, onDelta: (delta) => {
  pieces.push(delta);
  if (pieces.length === abortAfter) controller.abort();
}}).then((result) => console.log(JSON.stringify({pieces, result})),
         (error) => console.log(JSON.stringify({pieces, error: error.name})));
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = trained_engine(tmp_path_factory.mktemp("page"))
    with LiveServer(create_app(engine, ServeConfig(model_name=MODEL))) as live:
        yield live


def test_page_and_its_files_are_served_and_fetch_nothing_from_elsewhere(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("chat.js", "chat.css"):
        assert f"/static/{name}" in page.text
        assert httpx.get(f"{server.url}/static/{name}").text == (STATIC / name).read_text()
    for item in STATIC.iterdir():
        text = item.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, item.name


def run_node_client(server, body: dict, abort_after: int = 0) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed; it runs the page's chat.js outside a browser")
    with resources.as_file(STATIC / "chat.js") as script:
        completed = subprocess.run(
            [node, "-e", NODE_CLIENT, str(script), server.url, json.dumps(body), str(abort_after)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_the_pages_stream_reader_reassembles_the_answer(server):
    body = {"model": MODEL, "messages": PLAIN_CONVERSATION[:1], "temperature": 0}
    whole = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none").chat.completions.create(**body)
    streamed = run_node_client(server, body)
    assert (
        len(streamed["pieces"]) > 1
        and "".join(streamed["pieces"]) == whole.choices[0].message.content == "Hello there."
    )
    assert streamed["result"]["content"] == "Hello there." and streamed["result"]["finishReason"] == "stop"


def test_the_pages_stop_aborts_and_frees_the_slot(server):
    scheduler = server.app.state.service.scheduler
    hook = scheduler.model.register_forward_pre_hook(lambda module, inputs: time.sleep(0.02))  # a slow answer
    try:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "the sky"}],
            "temperature": 0,
            "max_tokens": 100,
        }
        stopped = run_node_client(server, body, abort_after=1)
        assert stopped["error"] == "AbortError" and len(stopped["pieces"]) == 1
        deadline = time.monotonic() + 1.5  # the answer would take about two seconds more on its own
        while scheduler.num_running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.num_running == 0
    finally:
        hook.remove()


def chromium_page(url: str, model: str):
    """A page of the chat app in headless Chromium (Debian's, driven by Playwright), loaded and greedy."""
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install playwright)"
    )
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("no Chromium found on PATH (Debian: apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            page.wait_for_function(f"document.getElementById('model-name').textContent.startsWith('{model}')")
            page.evaluate("document.getElementById('temperature').value = '0'")  # greedy: the reply is known
            yield page
        finally:
            browser.close()


def send(page, text: str) -> list[str]:
    """Type a message, wait for the streamed reply to finish; the assistant messages shown."""
    page.evaluate("document.getElementById('status').textContent = ''")
    page.fill("#user-input", text)
    page.press("#user-input", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('finished')", timeout=60_000)
    return page.locator(".message.assistant .content").all_text_contents()


def test_chat_page_in_headless_chromium(server):
    for page in chromium_page(server.url, "tiny"):
        assert send(page, "Hi") == ["Hello there."]
        page.evaluate("document.getElementById('status').textContent = ''")
        page.click("#regenerate")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('finished')", timeout=20_000)
        assert page.locator(".message.assistant .content").all_text_contents() == ["Hello there."]


def test_the_chat_page_talks_to_smollm2_in_its_own_format(smollm2_checkpoint):
    from llmkit.infer import Engine, EngineConfig

    engine = Engine.from_config(EngineConfig(checkpoint=str(smollm2_checkpoint)))
    with LiveServer(create_app(engine, ServeConfig(model_name="smollm2"))) as live:
        for page in chromium_page(live.url, "smollm2"):
            (reply,) = send(page, "What is the capital of France?")
            assert "Paris" in reply
