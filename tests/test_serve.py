"""serve.py against real clients: the official openai package (chat and completions, streamed and not, concurrent
streams, the API key), plain HTTP for bad input and disconnects, and the chat page in headless Chromium."""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, run

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
KEY = "test-key"
LIMITS = ["--max_messages=8", "--max_chars=2000", "--max_body=20000", "--max_tokens_limit=100000", "--max_batch=4"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained):
    """serve.py on the tiny trained model, with an API key and small limits; yields its base URL and process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--out_dir=out-tiny", "--device=cpu",
                             f"--port={port}", f"--api_key={KEY}", *LIMITS], cwd=trained, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.25)
    yield dict(url=url, proc=proc, workdir=trained)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err.strip().splitlines() == ["loading out-tiny ...", "stopped serving"], err
    assert out.startswith("serving out-tiny") and f"http://127.0.0.1:{port}" in out


def client(server, key=KEY):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0)


def post(server, path, body, key=KEY, raw=None):
    """(status, JSON) of a POST, however it ends."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(server["url"] + path, data=data, headers={"Authorization": f"Bearer {key}",
                                                                               "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_chat_and_completions_streamed_and_not_with_the_openai_client(server):
    api = client(server)
    assert [m.id for m in api.models.list().data] == ["out-tiny"]
    messages = [{"role": "system", "content": "Docs."}, {"role": "user", "content": "What is a list"}]
    whole = api.chat.completions.create(model="out-tiny", messages=messages, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.prompt_tokens > 0
    assert whole.usage.completion_tokens <= 12
    parts = list(api.chat.completions.create(model="out-tiny", messages=messages, max_tokens=12, temperature=0,
                                             stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == text  # the same greedy reply, streamed
    assert parts[0].choices[0].delta.role == "assistant" and parts[-1].choices[0].finish_reason
    done = api.completions.create(model="out-tiny", prompt="The ", max_tokens=10, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 10
    streamed = api.completions.create(model="out-tiny", prompt="The ", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    two = api.chat.completions.create(model="out-tiny", messages=messages, max_tokens=8, n=2, seed=5,
                                      extra_body={"top_k": 20, "repetition_penalty": 1.3})
    assert [c.index for c in two.choices] == [0, 1]
    again = api.chat.completions.create(model="out-tiny", messages=messages, max_tokens=8, n=2, seed=5,
                                        extra_body={"top_k": 20, "repetition_penalty": 1.3})
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]  # seeded
    stopped = api.completions.create(model="out-tiny", prompt="The ", max_tokens=40, temperature=0, stop=[" "])
    assert " " not in stopped.choices[0].text and stopped.choices[0].finish_reason in ("stop", "length")


def test_sample_chat_and_the_server_give_the_same_greedy_tokens_past_block_size(server):
    """One engine behind every caller: for the same prompt, sample.py's greedy text and the server's completion are
    the same, and chat.py's reply and the server's chat completion are the same, 60 tokens into the model's 32-token
    context (each row refilled with its newest half block on the way)."""
    w, api = server["workdir"], client(server)
    sampled = run("sample.py", "--out_dir=out-tiny", "--prompt=The with statement", "--temperature=0",
                  "--max_new_tokens=60", "--device=cpu", cwd=w).stdout
    served = api.completions.create(model="out-tiny", prompt="The with statement", max_tokens=60, temperature=0)
    assert sampled == "The with statement" + served.choices[0].text + "\n"  # sample.py: prompt, text, newline
    assert served.usage.completion_tokens == 60 and len(sampled) > len("The with statement") + 40
    chatted = run("chat.py", "--out_dir=out-tiny", "--temperature=0", "--max_new_tokens=60", cwd=w,
                  input="a list\n").stdout
    answer = api.chat.completions.create(model="out-tiny", messages=[{"role": "user", "content": "a list"}],
                                         max_tokens=60, temperature=0)
    reply = answer.choices[0].message.content
    printed = "".join(line for line in chatted.splitlines(keepends=True) if not line.startswith("(note"))
    assert printed == reply + "\n" and answer.usage.completion_tokens == 60 and len(reply) == 60


def test_an_oversized_body_is_a_413_the_client_reads_and_deep_json_a_400(server):
    """A body over max_body is drained, so a client still sending it reads the 413 JSON error rather than a reset
    connection (the openai client, 8 MB); JSON nested thousands deep is a 400 (not a 500 with a RecursionError in the
    server's log: the fixture checks that the log holds no traceback)."""
    with pytest.raises(openai.APIStatusError) as caught:
        client(server).chat.completions.create(model="out-tiny",
                                               messages=[{"role": "user", "content": "x" * 8_000_000}])
    assert caught.value.status_code == 413 and "bytes" in caught.value.message
    for raw in (b"[" * 9_000 + b"]" * 9_000, b'{"a":' * 3_000 + b"1" + b"}" * 3_000):  # under max_body (20,000)
        code, answer = post(server, "/v1/chat/completions", None, raw=raw)
        assert code == 400 and "nested too deep" in answer["error"]["message"], answer
    assert post(server, "/v1/completions", dict(prompt="The ", max_tokens=2))[0] == 200


def test_concurrent_streams_each_give_their_alone_text(server):
    """More streaming clients than rows (4): they queue, decode together, and each gets its alone-run greedy text."""
    api = client(server)
    prompts = ["The ", "A list ", "def ", "Import ", "class ", "Return ", "If the ", "When "]

    def ask(prompt):
        stream = api.completions.create(model="out-tiny", prompt=prompt, max_tokens=30, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream)
    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    request = urllib.request.Request(server["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                                     data=json.dumps(dict(prompt="The ", max_tokens=100000, stream=True)).encode())
    response = urllib.request.urlopen(request, timeout=60)
    assert response.readline().startswith(b"data: ")
    response.close()  # gone mid-stream, 100,000 tokens (a minute or more) before the end
    for _ in range(100):
        health = json.loads(urllib.request.urlopen(server["url"] + "/health").read())
        if health["active"] == 0:
            break
        time.sleep(0.1)
    assert health == dict(status="ok", model="out-tiny", active=0, waiting=0)


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BAD = [  # (body or raw bytes, status, the param or words the error names)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}] * 9}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 2001}]}, 400, "characters"),
    (dict(CHAT, temperature=-0.5), 400, "temperature"),
    (dict(CHAT, temperature="hot"), 400, "temperature"),
    (dict(CHAT, top_p=0), 400, "top_p"),
    (dict(CHAT, top_p=1.5), 400, "top_p"),
    (dict(CHAT, max_tokens=0), 400, "max_tokens"),
    (dict(CHAT, max_tokens=10**6), 400, "max_tokens"),
    (dict(CHAT, n=0), 400, "n"),
    (dict(CHAT, stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (dict(CHAT, stream="yes"), 400, "stream"),
    (dict(CHAT, presence_penalty=0.5), 400, "repetition_penalty"),
    (dict(CHAT, seed=2**70), 400, "seed"),
    ({"messages": [{"role": "user", "content": "y" * 1900}], "pad": "z" * 20000}, 413, "bytes"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(b)[:40] for b, *_ in BAD])
def test_bad_input_is_a_4xx_in_openais_shape_and_the_server_goes_on(server, body, status, words):
    raw = body if isinstance(body, bytes) else None
    code, answer = post(server, "/v1/chat/completions", body, raw=raw)
    assert code == status and set(answer["error"]) >= {"message", "type", "param"}, answer
    assert words in (answer["error"]["param"] or "") + answer["error"]["message"], answer
    assert post(server, "/v1/completions", dict(prompt="The ", max_tokens=2))[0] == 200


def test_the_api_key_is_needed_on_v1_and_a_bad_prompt_is_refused(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    assert post(server, "/v1/chat/completions", CHAT, key="")[0] == 401
    assert post(server, "/v1/completions", dict(prompt=["a", "b"]))[0] == 400
    assert urllib.request.urlopen(server["url"] + "/health").status == 200  # not under /v1: no key


def test_the_chat_page_in_a_real_browser(server):
    """Headless Chromium loads /, sends a message and sees the streamed reply."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (browser and driver_path):
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(server["url"] + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("20")
        driver.find_element(By.ID, "input").send_keys("What is a list")
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.user"))
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())  # the stream has ended
        reply = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        assert reply.text.strip() and "error" not in reply.get_attribute("class")
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "What is a list"
        assert "out-tiny" in driver.find_element(By.ID, "model").text
    finally:
        driver.quit()


def test_a_port_in_use_is_one_line(trained):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = run("serve.py", "--out_dir=out-tiny", f"--port={s.getsockname()[1]}", cwd=trained, ok=False)
    assert "cannot listen" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
