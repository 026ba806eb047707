"""
Serve a model over HTTP: OpenAI's chat and completions API (streamed or not) for any OpenAI client, and a chat page at
/ for a browser. One engine thread owns the model and decodes every request together (continuous batching: a new
request's prompt is prefilled into a free row of the KV cache and joins at the next step; a finished or disconnected
one frees its row at once). Needs FastAPI and uvicorn: pip install fastapi uvicorn.

    python serve.py --out_dir=out-char-tiny                 # http://127.0.0.1:8000
    python serve.py --init_from=hf:HuggingFaceTB/SmolLM2-135M-Instruct --port=8080
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \
        -d '{"messages": [{"role": "user", "content": "What is a list?"}], "max_tokens": 50}'
"""

import asyncio
import gc
import json
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid

import torch

from checkpoint import load_for_inference
from common import DTYPES, pick_device, pick_dtype
from configurator import NON_NEGATIVE, POSITIVE, check, configure
from errors import die
from generate import KVCache, compile_decode, prefill, sample_next, step
from quantize import check_kind, for_decoding
from sft import fit_conversation, template_for
from tokenizer import TextStream, encode_prompt

# -----------------------------------------------------------------------------
out_dir = "out-char-tiny"  # the training run to serve
ckpt = ""  # checkpoint file in out_dir; '' = ckpt.pt, or best.pt if that is all there is
init_from = "resume"  # resume (out_dir's checkpoint) | gpt2 ... gpt2-xl | hf:ORG/NAME | hf:FOLDER | a run or ckpt
ema = False  # serve the run's moving average of the weights (trained with --ema_decay)
block_size = 0  # a shorter context than the model's, for a smaller KV cache (0 = the model's)
device = ""  # cpu | cuda | mps; '' picks cuda > mps > cpu
dtype = "auto"  # float32 | bfloat16 | float16 (the weights are converted) | auto (bfloat16 on GPUs, float32 on CPU)
compile = False  # torch.compile the decode step (twice at the start, then for any batch)
quantize = ""  # int8: weight-only int8 matrices, faster decoding on a CPU (the greedy tokens may differ a little)
host = "127.0.0.1"  # the interface to listen on; 0.0.0.0 opens the server to the network
port = 8000  # the port to listen on
api_key = ""  # if set (or YOCTOGPT_API_KEY), every /v1 request needs `Authorization: Bearer KEY`
model_name = ""  # the model's id in /v1/models and the responses ('' = the out_dir's or init_from's name)
max_batch = 16  # requests decoded together (rows of the KV cache); more wait in a queue
max_queue = 256  # requests waiting for a row; beyond it a request gets 429
max_tokens_limit = 4096  # the most new tokens a request may ask for
max_messages = 256  # the most messages in a chat request
max_chars = 100_000  # the most characters in a request's messages or prompt
max_body = 1_000_000  # the largest request body, in bytes
# -----------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


class ApiError(Exception):
    """A request the API refuses: an HTTP status and OpenAI's error shape."""

    def __init__(self, status, message, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": None}}


# -----------------------------------------------------------------------------
# the engine: one thread owns the model and the KV cache, and decodes every live request in one batch


class Request:
    """One sequence to generate: its prompt, sampling controls, and where its text goes: `sink` = (event loop, asyncio
    queue, choice index), which receives (index, text, finish_reason or None)."""

    def __init__(self, ids, controls, max_tokens, stop_ids, stops, seed, tokenizer, sink):
        self.ids, self.controls, self.max_tokens, self.stop_ids = list(ids), controls, max_tokens, stop_ids
        self.stream, self.sink, self.new = TextStream(tokenizer, stops), sink, 0
        self.generator, self.seed, self.cancelled = None, seed, False  # a generator of its own when seeded


class Engine:
    """Continuous batching over the per-row KV cache (generate.py): live requests hold rows 0..n-1 and decode together
    one token per step; a waiting request is prefilled into the next free row between steps; a finished or cancelled
    one leaves at once, the last row moving into its place. run() belongs in the main thread: torch's CPU thread pool
    runs ~2x slower from another thread while the main one's pool waits (measured), so the HTTP server gets the
    other thread."""

    def __init__(self, model, rows, decode):
        self.model, self.decode, self.block = model, decode, model.config.block_size
        weights = next(model.parameters())
        self.device, self.cache = weights.device, KVCache(model.config, rows, weights.device, weights.dtype)
        self.rows, self.held, self.max_rows = [], [], rows  # live requests in row order; tokens in each row
        self.waiting, self.generator = queue.Queue(), torch.Generator(device=self.device)
        self.generator.seed()  # unseeded requests sample from a random stream

    @torch.no_grad()
    def warm_up(self):
        """Run the decode step on 1, 2 and 3 rows, so that a compiled one builds its graphs (one for any batch and
        span after the first) before the first request rather than during it."""
        rows = range(1, min(3, self.max_rows) + 1)
        for n in rows:
            self.decode(torch.zeros(n, 1, dtype=torch.long, device=self.device), self.cache.rows(0, n))
        for b in rows:
            self.cache.reset(b - 1)

    def submit(self, request):
        self.waiting.put(request)

    def admit(self, requests):
        """Prefill the prompts into the next free rows: prompts of the same length together, in one forward."""
        for length in sorted({len(r.ids[-self.block:]) for r in requests}):
            group = [r for r in requests if len(r.ids[-self.block:]) == length]
            b = len(self.rows)
            for r in group:
                self.cache.reset(len(self.rows))
                if r.seed is not None:  # its own generator: the same seed samples the same text in any batch
                    r.generator = torch.Generator(device=self.device).manual_seed(r.seed)
                self.rows.append(r)
                self.held.append(length - 1)
            if length > 1:
                prompts = torch.tensor([r.ids[-self.block:-1] for r in group], device=self.device)
                step(self.model, prompts, self.cache.rows(b, b + len(group)))

    def release(self, i):
        """Free row i: the last live row moves into it."""
        last = len(self.rows) - 1
        if i != last:
            self.cache.move(last, i)
            self.rows[i], self.held[i] = self.rows[last], self.held[last]
        self.rows.pop()
        self.held.pop()

    @torch.no_grad()
    def run(self, stop):
        """Serve requests until the `stop` event is set."""
        while not stop.is_set():
            new = []
            while len(self.rows) + len(new) < self.max_rows:  # take whoever waits, up to the free rows; idle: wait
                try:
                    busy = self.rows or new
                    request = self.waiting.get_nowait() if busy else self.waiting.get(timeout=0.2)
                except queue.Empty:
                    break
                if not request.cancelled:
                    new.append(request)
            self.admit(new)
            if not self.rows:
                continue
            try:
                self.step()
            except Exception as e:  # out of memory, say: every live request ends with the error, the server goes on
                self.send([(r, None, f"error: {type(e).__name__}: {str(e)[:200]}") for r in self.rows])
                self.rows, self.held = [], []

    def step(self):
        for i, request in enumerate(self.rows):  # a row that fills its slots is refilled with its newest half block
            if self.held[i] == self.block:
                ids = request.ids[-(self.block // 2):]
                prefill(self.model, self.cache, i, torch.tensor(ids[:-1], device=self.device))
                self.held[i] = len(ids) - 1
        n = len(self.rows)
        last = torch.tensor([[r.ids[-1]] for r in self.rows], device=self.device)
        logits = self.decode(last, self.cache.rows(0, n))  # (n, vocab)
        done, tokens, out = [], self.sample(logits), []
        for i, request in enumerate(self.rows):
            self.held[i] += 1
            if request.cancelled:
                done.append(i)
                continue
            token = tokens[i]
            request.ids.append(token)
            request.new += 1
            if token in request.stop_ids:
                out.append((request, request.stream.flush(), "stop"))
                done.append(i)
                continue
            text = request.stream.push(token)
            finish = "stop" if request.stream.stopped else "length" if request.new >= request.max_tokens else None
            out.append((request, text + (request.stream.flush() if finish else ""), finish))
            if finish:
                done.append(i)
        self.send(out)
        for i in reversed(done):
            self.release(i)

    @staticmethod
    def send(out):
        """Hand a step's texts to the HTTP side: one wake-up of its event loop per step, not one per request."""
        loops = {}
        for request, text, finish in out:
            loop, events, i = request.sink
            loops.setdefault(loop, []).append((events, (i, text, finish)))
        for loop, items in loops.items():
            loop.call_soon_threadsafe(lambda items=items: [events.put_nowait(item) for events, item in items])

    def sample(self, logits):
        """Every row's next token: rows with the same controls, no seed and no repetition penalty in one sample_next
        call (the engine's generator), the others one by one (their own generators, the tokens so far)."""
        tokens, groups = [None] * len(self.rows), {}
        for i, r in enumerate(self.rows):
            if r.generator is None and r.controls["repetition_penalty"] == 1.0:
                groups.setdefault(tuple(sorted(r.controls.items())), []).append(i)
            else:
                seen = torch.tensor([r.ids], device=self.device)
                tokens[i] = sample_next(logits[i:i + 1], seen=seen, generator=r.generator or self.generator,
                                        **r.controls).item()
        for controls, rows in groups.items():
            picked = sample_next(logits[rows], generator=self.generator, **dict(controls)).tolist()
            for i, token in zip(rows, picked, strict=True):
                tokens[i] = token
        return tokens

    def load(self):
        return dict(active=len(self.rows), waiting=self.waiting.qsize())


# -----------------------------------------------------------------------------
# the API: requests checked field by field, as OpenAI's API defines them


def number(body, name, default, low, high, kind=float, low_open=False):
    """body[name] as a number in [low, high] ((low, high] with low_open), or ApiError naming it."""
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    if not ok or not math.isfinite(value) or value > high or (value <= low if low_open else value < low):
        span = f"{'(' if low_open else '['}{low}, {high}]"
        raise ApiError(400, f"{name}={value!r} must be {'an integer' if kind is int else 'a number'} in {span}", name)
    return kind(value)


def sampling(body, limit):
    """The checked sampling fields common to both endpoints: (controls for sample_next, max_tokens, stops, seed, n)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise ApiError(400, f"{name} is not supported; use repetition_penalty (> 1 lowers repeated tokens)", name)
    for name in ("logprobs", "tools", "functions", "response_format", "logit_bias", "echo", "suffix"):
        if body.get(name):
            raise ApiError(400, f"{name} is not supported by this server", name)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = number(dict(max_tokens=max_tokens), "max_tokens", min(512, limit), 1, limit, int)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    controls = dict(temperature=number(body, "temperature", 1.0, 0, 2),
                    top_p=number(body, "top_p", 1.0, 0, 1, low_open=True),
                    top_k=number(body, "top_k", 0, 0, 1 << 31, int) or None, min_p=number(body, "min_p", 0.0, 0, 1),
                    repetition_penalty=number(body, "repetition_penalty", 1.0, 0, 100, low_open=True))
    seed = body.get("seed")
    if seed is not None:
        seed = number(body, "seed", None, 0, 2**63 - 1, int)
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "stream must be true or false", "stream")
    return controls, max_tokens, stops, seed, number(body, "n", 1, 1, 8, int)


def messages_of(body, max_messages, max_chars):
    """The chat's messages, checked: a non-empty list of {role, content}; content a string or a list of text parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    if len(messages) > max_messages:
        raise ApiError(400, f"{len(messages)} messages are more than this server takes ({max_messages})", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else None
            raise ApiError(400, f"messages[{i}].role={role!r} is not one of system, user, assistant",
                           f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string (or a list of text parts)",
                           f"messages[{i}].content")
        out.append(dict(role="system" if m["role"] == "developer" else m["role"], content=content))
    if sum(len(m["content"]) for m in out) > max_chars:
        raise ApiError(400, f"the messages hold more than {max_chars:,} characters", "messages")
    return out


def make_app(engine, model, tokenizer, settings):
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health and the chat page at /."""
    try:
        from fastapi import Depends, FastAPI
        from fastapi import Request as HttpRequest
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        die("serve.py needs FastAPI and uvicorn: pip install fastapi uvicorn")
    s, block, name = settings, model.config.block_size, settings["model_name"]
    template = template_for(getattr(tokenizer, "meta", None), tokenizer)
    key = s["api_key"] or os.environ.get("YOCTOGPT_API_KEY", "")

    async def guard(request: HttpRequest):  # every route's dependency (not a middleware: that would relay each chunk)
        if key and request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {key}":
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", kind="authentication_error")
        size = request.headers.get("content-length", "0")
        if not size.isdigit() or int(size) > s["max_body"]:
            raise ApiError(413, f"the request body is larger than {s['max_body']:,} bytes")

    app = FastAPI(title="yoctoGPT", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(guard)])

    def error(e):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # 404, 405: OpenAI's shape too
        return error(ApiError(e.status_code, str(e.detail), kind="invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return error(ApiError(400, "the request does not match the API"))

    @app.exception_handler(Exception)
    async def internal_error(request, e):  # a bug, not bad input: one line in the log, a 500 to the client
        print(f"error: {type(e).__name__}: {str(e)[:200]} ({request.url.path})", file=sys.stderr)
        return error(ApiError(500, "the server failed on this request", kind="server_error"))

    async def body_of(request):
        raw = await request.body()
        if len(raw) > s["max_body"]:
            raise ApiError(413, f"the request body is larger than {s['max_body']:,} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def known(text):  # a character vocabulary leaves out what it lacks (chat.py does the same)
        return tokenizer.known(text)[0] if hasattr(tokenizer, "known") else text

    async def generate(request, body, params, ids, stop_ids, kind):
        """Run n requests for the prompt ids on the engine (params: sampling()'s); the response, streamed or whole."""
        controls, max_tokens, stops, seed, n = params
        if engine.waiting.qsize() + n > s["max_queue"]:
            raise ApiError(429, "the server is busy; retry in a moment", kind="rate_limit_error")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        requests = [Request(ids, controls, max_tokens, stop_ids, list(template.stop_strings if kind == "chat" else [])
                            + stops, None if seed is None else seed + i, tokenizer, (loop, events, i))
                    for i in range(n)]
        for r in requests:
            engine.submit(r)
        rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def usage():
            new = sum(r.new for r in requests)
            return dict(prompt_tokens=len(ids), completion_tokens=new, total_tokens=len(ids) + new)

        def choice(i, text, finish, delta):
            if kind == "completion":
                return dict(index=i, text=text, finish_reason=finish, logprobs=None)
            content = dict(content=text) if delta else dict(role="assistant", content=text)
            return dict(index=i, finish_reason=finish, logprobs=None, **{"delta" if delta else "message": content})

        async def watch():  # a client gone before the end: a None in the events ends the response
            while not await request.is_disconnected():
                await asyncio.sleep(1.0)
            events.put_nowait(None)

        async def results():  # (i, text, finish) as the engine makes them, until every choice has finished
            left, watcher = n, asyncio.create_task(watch())
            try:
                while left:
                    event = await events.get()
                    if event is None:
                        return
                    i, text, finish = event
                    if finish and finish.startswith("error"):
                        raise ApiError(500, f"generation failed ({finish})", kind="server_error")
                    left -= finish is not None
                    yield i, text, finish
            finally:
                watcher.cancel()

        if not body.get("stream"):
            texts, finishes = [""] * n, [None] * n
            try:
                async for i, text, finish in results():
                    texts[i] += text
                    finishes[i] = finish
            finally:
                for r in requests:
                    r.cancelled = True  # a client gone before the end frees its rows
            return JSONResponse(dict(id=rid, object=obj, created=created, model=name, usage=usage(),
                                     choices=[choice(i, texts[i], finishes[i], False) for i in range(n)]))

        def chunk(choices, **extra):  # one Server-Sent Event
            data = dict(id=rid, object=obj + ".chunk" * (kind == "chat"), created=created, model=name, choices=choices)
            return f"data: {json.dumps(dict(data, **extra))}\n\n"

        async def stream():
            try:
                if kind == "chat":
                    yield chunk([dict(index=i, delta=dict(role="assistant", content=""), finish_reason=None)
                                 for i in range(n)])
                async for i, text, finish in results():
                    if text or finish:
                        yield chunk([choice(i, text, finish, True)])
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield chunk([], usage=usage())
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield f"data: {json.dumps(e.body)}\n\n"
            finally:
                for r in requests:
                    r.cancelled = True  # a disconnect mid-stream frees the rows at the next step

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await body_of(request)
        messages = [dict(m, content=known(m["content"])) for m in messages_of(body, s["max_messages"], s["max_chars"])]
        params = sampling(body, s["max_tokens_limit"])
        max_tokens = params[1]
        try:
            ids, _, _ = fit_conversation(template, messages, max(block - max_tokens, block // 2))
        except ValueError as e:  # a template that refuses the conversation
            raise ApiError(400, str(e), "messages") from None
        return await generate(request, body, params, ids, template.stop_ids, "chat")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", "prompt")
        if len(prompt) > s["max_chars"]:
            raise ApiError(400, f"the prompt holds more than {s['max_chars']:,} characters", "prompt")
        ids = encode_prompt(tokenizer, known(prompt))  # as sample.py primes it
        stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        return await generate(request, body, sampling(body, s["max_tokens_limit"]), ids, stop_ids, "completion")

    @app.get("/v1/models")
    async def models():
        return dict(object="list", data=[dict(id=name, object="model", created=int(time.time()), owned_by="yoctogpt",
                                              context_length=block)])

    @app.get("/health")
    async def health():
        return dict(status="ok", model=name, **engine.load())

    @app.get("/")
    async def page():
        return FileResponse(os.path.join(HERE, "serve.html"), media_type="text/html")

    return app


if __name__ == "__main__":
    config, _ = configure(globals())
    check(config, dict(block_size=NON_NEGATIVE, port=(lambda v: 0 <= v <= 65535, "a port in [0, 65535]"),
                       max_batch=POSITIVE, max_queue=POSITIVE, max_tokens_limit=POSITIVE, max_messages=POSITIVE,
                       max_chars=POSITIVE, max_body=POSITIVE))
    check_kind(quantize)
    try:
        import fastapi  # noqa: F401  (make_app's; checked here, before the model loads)
        import uvicorn
    except ImportError:
        die("serve.py needs FastAPI and uvicorn: pip install fastapi uvicorn")
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    source = out_dir if init_from == "resume" else init_from
    model, tokenizer = load_for_inference(source, device, ckpt, ema, block_size)
    model = for_decoding(model.to(DTYPES[dtype]), quantize)
    config["model_name"] = model_name or os.path.basename(os.path.normpath(source.removeprefix("hf:")))
    try:  # the port, before the model loads into a server that could not listen
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        die(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port (or --host)")
    engine = Engine(model, max_batch, compile_decode(model) if compile else lambda idx, cache: step(model, idx, cache))
    if compile:
        engine.warm_up()
    app = make_app(engine, model, tokenizer, config)
    print(f"serving {config['model_name']} ({model.num_params() / 1e6:.1f}M parameters, context "
          f"{model.config.block_size}) at http://{host}:{port} — OpenAI API at /v1, chat page at /", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error", access_log=False))
    http = threading.Thread(target=server.run, daemon=True, name="http")  # the engine keeps the main thread
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or SIGTERM: stop decoding, close the server, exit 0
        signal.signal(sig, lambda *_: stop.set())
    gc.freeze()  # what start-up made stays out of the collector: a full collection took ~100 ms, a stall mid-load
    http.start()
    engine.run(stop)
    server.should_exit = True
    http.join(timeout=10)
    print("stopped serving", file=sys.stderr)
