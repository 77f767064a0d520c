"""serve.py against the official `openai` client and a real browser: a server on a free loopback
port (uvicorn in a thread of the test process, the same code path as `python serve.py`), on a tiny
checkpoint trained here in seconds to answer with a think block under `detailed thinking on` and
without one under `off`. Checks: both modes streamed and not; greedy output equal to sample.py's;
32 concurrent streams (200 requests) equal to the same requests one at a time; bad requests get
OpenAI-style 4xx errors and the server keeps serving; a dropped stream does not stop the others;
the chat page in headless Chromium."""
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import torch.nn.functional as F

import serve
from checkpoint import load_model, save_model
from data import LLAMA3_SPECIAL_TOKENS, Tokenizer, load_tokenizer, split_reasoning
from model import ModelConfig, Transformer

openai = pytest.importorskip("openai")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
KEY = "test-key-123"
PROMPTS = ["hi", "hello there", "what is 2+2", "Add mod 10: 3+5", "name a color", "how are you"]
ANSWER = "ok."
THINK = "<think>\nthe user wants an answer.\n</think>\n\n" + ANSWER


def make_toggle_checkpoint(folder, steps=250):
    """A byte-level tokenizer (256 ranks + Llama 3's specials) and a 2-layer model taught the
    toggle: `on` -> THINK, `off` -> ANSWER, for every prompt of PROMPTS (a few seconds on a CPU)."""
    tok = Tokenizer({bytes([i]): i for i in range(256)}, {t: 256 + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)})
    torch.manual_seed(0)
    model = Transformer(ModelConfig.llama(2, vocab_size=tok.n_vocab, hidden_size=64, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128,
                                          max_position_embeddings=256))
    rows = []
    for p in PROMPTS:
        for mode, reply in (("on", THINK), ("off", ANSWER)):
            ids, mask = tok.render_chat([{"role": "system", "content": f"detailed thinking {mode}"},
                                         {"role": "user", "content": p}, {"role": "assistant", "content": reply}])
            rows.append((ids, mask))
    T = max(len(i) for i, _ in rows)
    x = torch.tensor([i + [tok.pad_id] * (T - len(i)) for i, _ in rows])
    y = torch.tensor([[t if m else -100 for t, m in zip(i[1:], mk[1:])] + [-100] * (T - len(i) + 1) for i, mk in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only lose by splitting (and a busy machine stalls them)
    try:
        for _ in range(steps):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    save_model(model.eval(), str(folder))
    tok.save(str(folder))
    return loss.item()


class Server:
    """uvicorn serving serve.create_app in a background thread, on a port the OS picked."""

    def __init__(self, ckpt, **kw):
        import uvicorn
        self.cfg = serve.ServeConfig(ckpt=str(ckpt), port=0, compile=False, **kw)
        self.cfg.validate()
        model = load_model(str(ckpt)).eval()
        tok = load_tokenizer(str(ckpt))
        self.app = serve.create_app(self.cfg, model, tok, api_key=KEY)
        self.engine = self.app.state.engine
        self.sock = serve.bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toggle_ckpt")
    loss = make_toggle_checkpoint(folder)
    assert loss < 0.05, loss
    return folder


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt)
    yield s
    s.stop()


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60, **kw)


def chat(mode, prompt):
    return [{"role": "system", "content": f"detailed thinking {mode}"}, {"role": "user", "content": prompt}]


def test_both_modes_streamed_and_not(server):
    c = client(server)
    models = c.models.list().data
    assert models[0].id == os.path.basename(server.cfg.ckpt) and models[0].default_reasoning == "off"
    for mode in ("on", "off"):
        r = c.chat.completions.create(model="anything", messages=chat(mode, "hi"), temperature=0, max_tokens=60)
        msg = r.choices[0].message
        if mode == "on":
            assert msg.reasoning_content == "the user wants an answer." and msg.content == ANSWER
        else:
            assert getattr(msg, "reasoning_content", None) is None and msg.content == ANSWER
            assert "<think>" not in msg.content
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens == len((THINK if mode == "on" else ANSWER).encode()) + 1
        reasoning, content, finish, usage = "", "", None, None
        for chunk in c.chat.completions.create(model="x", messages=chat(mode, "hi"), temperature=0, max_tokens=60,
                                               stream=True, stream_options={"include_usage": True}):
            if chunk.usage:
                usage = chunk.usage
            for ch in chunk.choices:
                reasoning += getattr(ch.delta, "reasoning_content", None) or ""
                content += ch.delta.content or ""
                finish = ch.finish_reason or finish
        assert (reasoning or None, content, finish) == (msg.reasoning_content if mode == "on" else None, ANSWER, "stop")
        assert usage.completion_tokens == r.usage.completion_tokens
    # no system message: the server's default (off); n and stop strings; a multi-turn history
    r = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], temperature=0, n=2,
                                  max_tokens=60)
    assert [ch.message.content for ch in r.choices] == [ANSWER, ANSWER]
    r = c.chat.completions.create(model="x", messages=chat("on", "hi"), temperature=0, max_tokens=60, stop=["wants"])
    assert r.choices[0].message.reasoning_content == "the user" and r.choices[0].message.content == ""
    r = c.chat.completions.create(model="x", messages=chat("on", "hi") + [
        {"role": "assistant", "content": THINK}, {"role": "user", "content": "hello there"}], temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    # sampling with a seed repeats itself
    a, b = (c.chat.completions.create(model="x", messages=chat("on", "what is"), temperature=1.0, top_p=0.9, seed=7,
                                      max_tokens=30).choices[0].message for _ in range(2))
    assert (a.content, getattr(a, "reasoning_content", None)) == (b.content, getattr(b, "reasoning_content", None))


def test_greedy_equals_sample_py(server, tmp_path):
    """The same prompts through sample.py (one subprocess, --prompts in both modes) and the server:
    the same tokens, so the same text once the server's parser has split it."""
    rows = [{"prompt": p, "reasoning": m} for m in ("on", "off") for p in ("name a color", "tell me a story")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={server.cfg.ckpt}", f"--prompts={tmp_path / 'p.jsonl'}",
                        "--temperature=0", "--max_new_tokens=60", "--compile=False"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    c = client(server)
    for row in map(json.loads, r.stdout.splitlines()):
        msg = c.chat.completions.create(model="x", messages=chat(row["reasoning"], row["prompt"]), temperature=0,
                                        max_tokens=60).choices[0].message
        assert (getattr(msg, "reasoning_content", None), msg.content) == serve.split_think(row["response"], True), row
    assert split_reasoning(json.loads(r.stdout.splitlines()[0])["response"]) == ("the user wants an answer.", ANSWER)


def test_32_concurrent_streams_equal_one_at_a_time(server):
    variants = [(m, p, n) for m in ("on", "off") for p in PROMPTS[:3] + ["tell me a story", "zzz"] for n in (12, 40)]

    async def one(ac, mode, prompt, n):
        text = ""
        stream = await ac.chat.completions.create(model="x", messages=chat(mode, prompt), temperature=0,
                                                  max_tokens=n, stream=True)
        async for chunk in stream:
            for ch in chunk.choices:
                text += (getattr(ch.delta, "reasoning_content", None) or "") + "|" + (ch.delta.content or "")
        return text

    async def main():
        # a generous timeout: on a loaded 2-core machine a stream can wait long for its batch
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)
        alone = [await one(ac, *v) for v in variants]
        before = len(server.engine.batches)
        sem = asyncio.Semaphore(32)

        async def limited(i):
            async with sem:
                return i, await one(ac, *variants[i % len(variants)])
        results = await asyncio.gather(*(limited(i) for i in range(200)))
        await ac.close()
        return alone, results, server.engine.batches[before:]
    alone, results, batches = asyncio.run(main())
    assert len(results) == 200
    for i, text in results:
        assert text == alone[i % len(variants)], i
    assert max(batches) > 8 and len(batches) < 100, batches  # decoded together, not one by one


def raw(server, body, key=KEY, content=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60,
                      content=content if content is not None else json.dumps(body))


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    ok = {"messages": chat("off", "hi"), "max_tokens": 8, "temperature": 0}
    cases = [
        (None, b"{not json", 400),
        ({}, None, 400),
        ({"messages": []}, None, 400),
        ({"messages": [{"role": "robot", "content": "hi"}]}, None, 400),
        ({"messages": [{"role": "user", "content": 5}]}, None, 400),
        ({"messages": [{"role": "user", "content": None}]}, None, 400),
        ({"messages": "hi"}, None, 400),
        ({**ok, "max_tokens": 0}, None, 400),
        ({**ok, "max_tokens": -3}, None, 400),
        ({**ok, "max_tokens": 10_000}, None, 400),
        ({**ok, "max_completion_tokens": 10_000}, None, 400),
        ({**ok, "max_tokens": "8"}, None, 400),
        ({**ok, "temperature": -0.1}, None, 400),
        ({**ok, "temperature": "hot"}, None, 400),
        ({**ok, "top_p": 0}, None, 400),
        ({**ok, "top_p": 1.5}, None, 400),
        ({**ok, "stream": "yes"}, None, 400),
        ({**ok, "n": 0}, None, 400),
        ({**ok, "stop": 3}, None, 400),
        ({"messages": [{"role": "user", "content": "x " * 400}]}, None, 400),  # past the context of 256
        ({"messages": chat("off", "hi") + [{"role": "system", "content": "late"}]}, None, 400),
        (None, b"x" * 1_100_000, 413),
    ]
    for body, content, status in cases:
        r = raw(server, body, content=content)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    param = {json.dumps(b): raw(server, b).json()["error"]["param"] for b, _, _ in cases[7:10] if b}
    assert set(param.values()) == {"max_tokens"}
    for key in (None, "wrong-key", KEY + "x"):
        r = raw(server, ok, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/nope").status_code == 404
    r = raw(server, {**ok, "unknown_field": {"x": 1}, "model": "whatever"})  # unknown fields are ignored
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWER
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert "<html" in httpx.get(server.url + "/").text


def test_a_dropped_stream_does_not_stop_the_others(server):
    def slow(mode):  # an unseen prompt: the model rambles until max_tokens
        return {"messages": chat(mode, "zzz qqq"), "max_tokens": 180, "temperature": 0, "stream": True}

    headers = {"Authorization": f"Bearer {KEY}"}
    results = {}

    def full():
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=slow("on"), headers=headers,
                          timeout=120) as r:
            results["lines"] = [line for line in r.iter_lines() if line]
    t = threading.Thread(target=full)
    t.start()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=slow("off"), headers=headers,
                      timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # leave mid-stream: the connection closes
    t.join(120)
    assert results["lines"][-1] == "data: [DONE]"
    assert any('"finish_reason": "' in line for line in results["lines"])
    r = raw(server, {"messages": chat("off", "hi"), "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200


def test_full_queue_gives_503(ckpt):
    from starlette.testclient import TestClient
    cfg = serve.ServeConfig(ckpt=str(ckpt), compile=False, queue_size=1)
    app = serve.create_app(cfg, load_model(str(ckpt)).eval(), load_tokenizer(str(ckpt)), start_worker=False)
    app.state.engine.pending.append(object())  # one request waiting, no worker to take it
    r = TestClient(app).post("/v1/chat/completions", json={"messages": chat("off", "hi")})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"


def test_split_think_streams_prefixes():
    """Each prefix's (reasoning, answer) extends the previous one, and the last equals the
    whole text's: what the stream sends adds up to the non-streamed message."""
    for text in (THINK, ANSWER, "<thi", "<think>\nnever closed", " <think>a</think>b </think> c", "a <think> b"):
        sent_r, sent_c = "", ""
        for k in range(1, len(text) + 1):
            r, c = serve.split_think(text[:k], final=k == len(text))
            assert (r or "").startswith(sent_r) and c.startswith(sent_c), (text, k)
            sent_r, sent_c = r or "", c
        assert (r, c) == split_reasoning(text) or text.count("</think>") > 1


CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)), reason="no chromium + chromedriver")
def test_chat_page_in_headless_chromium(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    try:
        driver.set_page_load_timeout(60)
        driver.get(server.url + "/")
        key = driver.find_element(By.ID, "key")
        key.send_keys(KEY)
        box = driver.find_element(By.ID, "reasoning")
        if not box.is_selected():
            box.click()
        prompt = driver.find_element(By.ID, "prompt")
        prompt.send_keys("hi")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))
        think = driver.find_element(By.CSS_SELECTOR, ".assistant details.think")
        assert think.get_attribute("hidden") is None and think.get_attribute("open") is None  # shown, collapsed
        assert driver.execute_script("return arguments[0].querySelector('pre').textContent", think) == \
            "the user wants an answer."
        assert driver.find_element(By.CSS_SELECTOR, ".assistant .answer").text == ANSWER
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
        driver.save_screenshot(str(tmp_path / "chat.png"))
        assert (tmp_path / "chat.png").stat().st_size > 1000
    finally:
        driver.quit()
