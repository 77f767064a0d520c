"""
serve.py: a checkpoint behind an OpenAI-compatible chat API and a browser chat page, with the
reasoning toggle exactly as the model card has it (system message `detailed thinking on|off`).

    python serve.py --ckpt=out/grpo                                  # http://127.0.0.1:8000
    python serve.py --ckpt=out/grpo --host=0.0.0.0 --port=8080 --api_key=KEY   # or NANO_API_KEY=KEY

Endpoints: POST /v1/chat/completions (plain JSON, or `"stream": true` server-sent events in
OpenAI's chunk format ending `data: [DONE]`), GET /v1/models, GET /health, GET / (serve.html).
With reasoning on, the think block goes to `reasoning_content` and the answer to `content`, as
vLLM's reasoning parsers return it; the template strips earlier turns' reasoning from the history.

Batching: one background thread runs the decoding. Requests that arrive together (within
--batch_wait_ms, up to --max_batch rows, the same sampling settings) are decoded in one batched
model.generate call with the static KV cache and (with --compile) the compiled decode step; a
request arriving while a batch runs waits for the next one (static batching, not continuous).
A client that disconnects, a stop string or a request's own max_tokens ends its row at once; the
call ends when every row is done. More than --queue_size waiting requests: 503.

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx status.
FastAPI + uvicorn carry the HTTP; this file does what only the project knows (template, toggle,
batching, decoding).
"""
import asyncio
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

from configurator import ConfigError, check, check_choice, check_positive, check_range, check_readable, run_main
from data import THINK_END, THINK_START

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class ServeConfig:
    ckpt: str = "out/grpo"              # checkpoint folder (any format sample.py loads)
    host: str = "127.0.0.1"             # loopback only unless told otherwise
    port: int = 8000                    # 0: any free port (printed on stderr)
    api_key: str = ""                   # require `Authorization: Bearer KEY` (default: $NANO_API_KEY)
    max_batch: int = 32                 # rows per generate call
    queue_size: int = 256               # waiting requests before 503
    batch_wait_ms: float = 5.0          # how long the worker waits for requests arriving together
    default_reasoning: str = "off"      # on | off | none: the toggle when a request has no system message
                                        # (none: an empty system prompt, as the template renders it)
    max_tokens_default: int = 256       # when a request gives no max_tokens (at most what the context leaves)
    max_n: int = 8                      # choices per request
    max_body_bytes: int = 1_000_000     # request body limit (413 beyond)
    device: str = "auto"                # auto | cpu | cuda
    dtype: str = "auto"                 # auto | float32 | bfloat16 | float16
    compile: bool = True                # compiled decode step (batch sizes rounded up to powers of 2)

    def validate(self):
        check_range(self, "port", 0, 65535)
        check_positive(self, "max_batch", "queue_size", "max_tokens_default", "max_n", "max_body_bytes")
        check_range(self, "batch_wait_ms", 0, 10_000)
        check_choice(self, "default_reasoning", ("on", "off", "none"))
        check_choice(self, "device", ("auto", "cpu", "cuda"))
        check_choice(self, "dtype", ("auto", "float32", "bfloat16", "float16"))
        check(self.max_n <= self.max_batch, "max_n", self.max_n, f"must be <= --max_batch={self.max_batch}")
        check(self.host.strip() != "", "host", self.host, "give an address to bind, e.g. 127.0.0.1")
        check_readable(self.ckpt, "ckpt", "dir")


# ------------------------------------------------------------------------------------------------
# Request checking: every field OpenAI's API defines that matters here, with OpenAI's error shape.

class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, type="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _field(body, name, ok, what):
    """body[name] if present and not null, checked by ok(); None if absent."""
    v = body.get(name)
    if v is not None and not ok(v):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(v)[:80]}", param=name, code="invalid_type")
    return v


SAMPLING_DEFAULTS = {"on": (0.6, 0.95), "off": (0.0, 1.0)}  # sample.py's, the paper's decoding settings


def parse_request(body, tok, context, cfg):
    """The JSON body -> a dict of what the decoder needs, or APIError (400). Unknown fields are
    ignored, as OpenAI does."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages",
                       code="missing_required_parameter" if msgs is None else "invalid_type")
    conv = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", param=where, code="invalid_type")
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role must be 'system', 'user' or 'assistant', got {json.dumps(role)[:40]}",
                           param=f"{where}.role", code="invalid_value")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)  # OpenAI's text content parts
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string, got {json.dumps(content)[:40]}",
                           param=f"{where}.content", code="invalid_type")
        if role == "system" and i > 0:
            raise APIError(400, f"{where}: a system message may only come first", param=f"{where}.role",
                           code="invalid_value")
        conv.append({"role": role, "content": content})
    if conv[-1]["role"] != "user":
        raise APIError(400, "the last message must be a user message", param=f"messages[{len(conv) - 1}].role",
                       code="invalid_value")
    # The toggle: a system message `detailed thinking on|off`; none: the server's default.
    reasoning = None
    if conv[0]["role"] == "system":
        reasoning = {"detailed thinking on": "on", "detailed thinking off": "off"}.get(conv[0]["content"].strip())
    elif cfg.default_reasoning != "none":
        reasoning = cfg.default_reasoning
        conv.insert(0, {"role": "system", "content": f"detailed thinking {reasoning}"})
    try:
        prompt = tok.render_chat(conv, add_generation_prompt=True)[0]
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
    room = context - len(prompt) + 1  # model.generate: prompt + max_tokens - 1 <= context
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is {context}",
                       param="messages", code="context_length_exceeded")
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        v = _field(body, name, _is_int, "an integer")
        if v is not None:
            if v <= 0:
                raise APIError(400, f"'{name}' must be >= 1, got {v}", param=name, code="invalid_value")
            if v > room:
                raise APIError(400, f"'{name}'={v} is past the context: the prompt is {len(prompt)} tokens, "
                               f"the context {context}, so at most {room}", param=name,
                               code="context_length_exceeded")
            max_tokens = max_tokens or v
    t_def, p_def = SAMPLING_DEFAULTS.get(reasoning or "off")
    temperature = _field(body, "temperature", _is_number, "a number")
    if temperature is not None and not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be in [0, 2], got {temperature}", param="temperature",
                       code="invalid_value")
    top_p = _field(body, "top_p", _is_number, "a number")
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p", code="invalid_value")
    stop = _field(body, "stop", lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) <= 4
                                                                  and all(isinstance(s, str) for s in v)),
                  "a string or a list of up to 4 strings")
    stop = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
    seed = _field(body, "seed", _is_int, "an integer")
    n = _field(body, "n", _is_int, "an integer")
    if n is not None and not 1 <= n <= cfg.max_n:
        raise APIError(400, f"'n' must be in [1, {cfg.max_n}], got {n}", param="n", code="invalid_value")
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "a boolean")
    opts = _field(body, "stream_options", lambda v: isinstance(v, dict), "an object") or {}
    _field(body, "model", lambda v: isinstance(v, str), "a string")  # any name: one model is served
    temperature = float(t_def if temperature is None else temperature)
    top_p = float(p_def if top_p is None else top_p)
    return dict(prompt=prompt, reasoning=reasoning, max_tokens=max_tokens or min(cfg.max_tokens_default, room),
                temperature=temperature, top_p=top_p if temperature > 0 else None, stop=stop, seed=seed,
                n=n or 1, stream=bool(stream), include_usage=bool(opts.get("include_usage")))


def split_think(text, final):
    """Generated text -> (reasoning or None, answer), the same for the whole text and, grown token
    by token, for every prefix: each call's strings extend the previous call's, so a stream can
    send the differences. Until the text is known not to begin with <think> nothing is shown; an
    unfinished tag at the end is held back until it is complete. final=True: the whole text."""
    s = text.lstrip()
    if s.startswith(THINK_START):
        body = s[len(THINK_START):]
        if THINK_END in body:
            reasoning, answer = body.split(THINK_END, 1)
            return reasoning.strip(), answer.strip()
        if not final:
            body = body[:len(body) - _partial_suffix(body, THINK_END)]
        return body.strip(), ""
    if not final and THINK_START.startswith(s):  # "", "<", "<th", ...: not decided yet
        return None, ""
    return None, s.rstrip()


def _partial_suffix(text, *tags):
    """Length of the longest end of text that is the beginning of one of tags (not all of it)."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


# ------------------------------------------------------------------------------------------------
# The decode worker: one thread, batched generate calls.

class Overloaded(Exception):
    pass


class Row:
    """One choice of one request: its tokens so far and what the client has been sent."""

    def __init__(self, req, index, seed, dummy=False):
        self.req, self.index, self.seed, self.dummy = req, index, seed, dummy
        self.tokens, self.seen, self.finish_reason = [], 0, None
        self.sent_reasoning, self.sent_content = "", ""
        self.reasoning, self.content = None, ""


class Request:
    """A checked request waiting for or in a batch. The worker thread pushes events onto an asyncio
    queue of the server's event loop: ("delta", index, reasoning_delta, content_delta),
    ("finish", index, reason), ("done",), ("error", message)."""

    def __init__(self, spec, loop):
        self.__dict__.update(spec)
        self.loop, self.events = loop, asyncio.Queue()
        self.cancelled, self.finished = False, False
        seeds = [None if self.seed is None else self.seed + i for i in range(self.n)]
        self.rows = [Row(self, i, s) for i, s in enumerate(seeds)]

    def key(self):
        """Requests decode together only with the same sampling settings (generate takes one)."""
        return (self.temperature, self.top_p)

    def push(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def usage(self):
        done = sum(r.seen for r in self.rows)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": done, "total_tokens": len(self.prompt) + done}


class Engine:
    def __init__(self, model, tok, cfg):
        self.model, self.tok, self.cfg = model, tok, cfg
        self.context = model.config.max_position_embeddings
        self.pending, self.cv = deque(), threading.Condition()
        self.running = 0
        self.batches = []  # rows of every batch decoded (for /health and the tests)

    def start(self):
        threading.Thread(target=self.run, name="decode-worker", daemon=True).start()

    def submit(self, req):
        with self.cv:
            if len(self.pending) >= self.cfg.queue_size:
                raise Overloaded()
            self.pending.append(req)
            self.cv.notify()

    def take(self):
        """Under the lock: the oldest waiting request and every later one that can share its batch
        (same sampling settings, rows <= max_batch, the longest prompt + the largest max_tokens
        within the context). Cancelled waiting requests are dropped."""
        while self.pending and self.pending[0].cancelled:
            self.pending.popleft()
        if not self.pending:
            return []
        first, batch, rest, rows = self.pending[0], [], deque(), 0
        longest, most = 0, 0
        for req in self.pending:
            fits = (not req.cancelled and req.key() == first.key() and rows + req.n <= self.cfg.max_batch
                    and max(longest, len(req.prompt)) + max(most, req.max_tokens) - 1 <= self.context)
            if fits:
                batch.append(req)
                rows += req.n
                longest, most = max(longest, len(req.prompt)), max(most, req.max_tokens)
            elif not req.cancelled:
                rest.append(req)
        self.pending = rest
        return batch

    def run(self):
        while True:
            with self.cv:
                while not self.pending:
                    self.cv.wait()
            time.sleep(self.cfg.batch_wait_ms / 1000)  # let requests that arrive together join
            with self.cv:
                batch = self.take()
            if not batch:
                continue
            try:
                self.decode(batch)
            except Exception as e:  # a bug or NaN logits: fail these requests, keep serving
                traceback.print_exc()
                for req in batch:
                    req.finished = True
                    req.push("error", f"{type(e).__name__}: {e}")
            finally:
                self.running = 0

    def decode(self, batch):
        rows = [r for req in batch for r in req.rows]
        if self.cfg.compile:
            # A compiled step is specialised to the batch size: round it up to a power of two
            # (<= 6 graphs up to 32 rows) with rows that finish at once.
            size = 1 << (len(rows) - 1).bit_length()
            rows += [Row(batch[0], -1, None, dummy=True) for _ in range(size - len(rows))]
        self.running = len(rows)
        self.batches.append(len(rows))
        n_new = max(req.max_tokens for req in batch)
        tok = self.tok

        def stream(new):
            finish = []
            for i, (row, t) in enumerate(zip(rows, new.tolist())):
                if row.finish_reason is None and self.advance(row, t):
                    finish.append(i)
            return finish
        outs = self.model.generate([r.req.prompt if not r.dummy else [tok.bos_id] for r in rows], n_new,
                                   temperature=batch[0].temperature, top_p=batch[0].top_p, stop_ids=tok.stop_ids,
                                   seed=[r.seed for r in rows], pad_id=tok.pad_id, vocab_limit=tok.n_vocab,
                                   compile=self.cfg.compile, stream=stream)
        # generate's own output is the record: the last step's tokens may not have been streamed
        for row, out in zip(rows, outs):
            for t in out[row.seen:]:
                if row.finish_reason is not None:
                    break
                self.advance(row, t)
            if row.finish_reason is None:
                self.end(row, "length")
        for req in batch:
            req.finished = True
            req.push("done")

    def advance(self, row, t):
        """One new token of a row; True when the row must end now (the model's own stop token ends
        it inside generate)."""
        if row.dummy:
            row.finish_reason = "dummy"
            return True
        row.seen += 1
        req = row.req
        if t in self.tok.stop_ids:
            self.end(row, "stop")
            return False
        row.tokens.append(t)
        text = self.tok.decode(row.tokens)
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string: the text before it, as OpenAI returns it
            self.end(row, "stop", text[:cut])
            return True
        if req.cancelled:
            self.end(row, "cancelled")
            return True
        if len(row.tokens) >= req.max_tokens:
            self.end(row, "length", text)
            return True
        if text.endswith("\ufffd"):  # the rest of a multi-byte character comes with the next token
            return False
        self.emit(row, text[:len(text) - _partial_suffix(text, *req.stop)], final=False)
        return False

    def emit(self, row, text, final):
        reasoning, content = split_think(text, final)
        dr = dc = ""
        if reasoning is not None and reasoning.startswith(row.sent_reasoning):
            dr, row.sent_reasoning = reasoning[len(row.sent_reasoning):], reasoning
        if content.startswith(row.sent_content):
            dc, row.sent_content = content[len(row.sent_content):], content
        if reasoning is not None:
            row.reasoning = row.sent_reasoning
        row.content = row.sent_content
        if dr or dc:
            row.req.push("delta", row.index, dr, dc)

    def end(self, row, reason, text=None):
        """Finish a row: the whole text (or the text before a stop string) parsed a last time,
        then its finish reason (a cancelled row's client is gone: nothing is sent)."""
        if row.finish_reason is not None:
            return
        row.finish_reason = reason
        if reason != "cancelled":
            self.emit(row, self.tok.decode(row.tokens) if text is None else text, final=True)
            row.req.push("finish", row.index, reason)


# ------------------------------------------------------------------------------------------------
# HTTP: FastAPI routes around the engine.

def create_app(cfg, model, tok, api_key="", start_worker=True):
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    name = os.path.basename(os.path.normpath(cfg.ckpt))
    engine = Engine(model, tok, cfg)
    if start_worker:
        engine.start()
    created = int(time.time())
    with open(os.path.join(HERE, "serve.html"), encoding="utf-8") as f:
        page = f.read()
    app = FastAPI(title="nanoNemotron", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return JSONResponse(APIError(e.status_code, str(e.detail), code=None).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    def authorize(request):
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # constant time: the comparison does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_json(request):
        limit = cfg.max_body_bytes
        too_big = APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "waiting": len(engine.pending), "running_rows": engine.running}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        authorize(request)
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": created, "owned_by": "nanoNemotron",
            "context_length": engine.context,
            "default_reasoning": cfg.default_reasoning,
            "reasoning_toggle": "a first system message 'detailed thinking on' or 'detailed thinking off'"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        authorize(request)
        spec = parse_request(await read_json(request), tok, engine.context, cfg)
        req = Request(spec, asyncio.get_running_loop())
        try:
            engine.submit(req)
        except Overloaded:
            raise APIError(503, f"the server is busy: {cfg.queue_size} requests are waiting; retry later",
                           type="server_error", code="server_overloaded") from None
        cid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": cid, "created": now, "model": name, "system_fingerprint": None}
        if req.stream:
            return StreamingResponse(sse(req, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(req.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # the client gave up: free its rows
                        req.cancelled = True
                        return JSONResponse({}, status_code=499)
                    continue
                if ev[0] == "error":
                    raise APIError(500, ev[1], type="server_error", code="internal_error")
                if ev[0] == "done":
                    break
        finally:
            if not req.finished:
                req.cancelled = True
        choices = []
        for r in req.rows:
            msg = {"role": "assistant", "content": r.content}
            if r.reasoning is not None:
                msg["reasoning_content"] = r.reasoning
            choices.append({"index": r.index, "message": msg, "logprobs": None, "finish_reason": r.finish_reason})
        return {**head, "object": "chat.completion", "choices": choices, "usage": req.usage()}

    async def sse(req, head):
        def chunk(choices, **extra):
            return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"
        try:
            yield chunk([{"index": r.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for r in req.rows])
            while True:
                ev = await req.events.get()
                if ev[0] == "delta":
                    delta = {}
                    if ev[2]:
                        delta["reasoning_content"] = ev[2]
                    if ev[3]:
                        delta["content"] = ev[3]
                    yield chunk([{"index": ev[1], "delta": delta, "logprobs": None, "finish_reason": None}])
                elif ev[0] == "finish":
                    yield chunk([{"index": ev[1], "delta": {}, "logprobs": None, "finish_reason": ev[2]}])
                elif ev[0] == "error":  # headers are sent: the error travels in the stream
                    yield f"data: {json.dumps(APIError(500, ev[1], type='server_error').body())}\n\n"
                    break
                else:
                    break
            if req.include_usage:
                yield chunk([], usage=req.usage())
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (the response task is cancelled)
            if not req.finished:
                req.cancelled = True

    return app


def bind(host, port):
    """Our own listening socket, so a taken port is one `error:` line (and port 0 gets a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host={host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port={port}: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


def main(cfg):
    import uvicorn

    from sample import load
    api_key = cfg.api_key or os.environ.get("NANO_API_KEY", "")
    sock = bind(cfg.host, cfg.port)
    model, tok, _ = load(cfg)
    app = create_app(cfg, model, tok, api_key)
    host, port = sock.getsockname()[:2]
    print(f"[serving {cfg.ckpt} at http://{host}:{port}/ ; default reasoning {cfg.default_reasoning}; "
          f"API key {'required' if api_key else 'not required'}; max batch {cfg.max_batch}]", file=sys.stderr,
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    server.run(sockets=[sock])


if __name__ == "__main__":
    run_main(main, ServeConfig)
