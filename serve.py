"""
Serve a model over HTTP: OpenAI's chat and completions API (streamed or not) for any OpenAI client, and a chat page at
/ for a browser. The one engine (generate.py) owns the model in the main thread and decodes every request together
(continuous batching); this file keeps only HTTP: requests checked (api.py), sequences queued, text sent back.
Needs FastAPI and uvicorn: pip install fastapi uvicorn.

    python serve.py --out_dir=out-char-tiny                 # http://127.0.0.1:8000
    python serve.py --init_from=hf:HuggingFaceTB/SmolLM2-135M-Instruct --port=8080
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \
        -d '{"messages": [{"role": "user", "content": "What is a list?"}], "max_tokens": 50}'
"""

import asyncio
import gc
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid

try:  # optional at run time: main() says what to install
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError:
    FastAPI = Request = None

from api import ApiError, messages_of, params_of
from chat_templates import fit_conversation, template_for
from configurator import POSITIVE, check, configure, declare
from errors import die
from generate import DECODE_SETTINGS, Engine, Sequence, compile_decode
from inference import LOAD_SETTINGS, load_for_inference, source_of
from quantize import num_weights
from tokenizer import encode_prompt

# -----------------------------------------------------------------------------
RULES = declare(globals(), LOAD_SETTINGS, DECODE_SETTINGS)  # out_dir, init_from, device, dtype, compile, ...
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
DRAIN_LIMIT = 64 * 2**20  # a body over max_body is read and dropped up to this many bytes, then the connection closes


async def drain(request):
    """Read and drop a body too large to take (up to DRAIN_LIMIT bytes): a client still sending it then reads the
    413 instead of a connection reset mid-send."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_LIMIT:
                break
    except ClientDisconnect:
        pass


async def read_body(request):
    """The request's JSON object: 413 past max_body (the rest drained), 400 for what is not a JSON object."""
    limit, raw = request.app.state.settings["max_body"], bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            await drain(request)
            raise ApiError(413, f"the request body is larger than {limit:,} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser goes
        raise ApiError(400, "the request body is not valid JSON (or is nested too deep)") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def guard(request: Request):
    """Every route's dependency (not a middleware: that would relay each chunk): the API key, and the body's
    declared size."""
    key = request.app.state.key
    if key and request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {key}":
        raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", kind="authentication_error")
    size, limit = request.headers.get("content-length", "0"), request.app.state.settings["max_body"]
    if not size.isdigit() or int(size) > limit:
        await drain(request)
        raise ApiError(413, f"the request body is larger than {limit:,} bytes")


# -----------------------------------------------------------------------------
# replies: an API call's sequences on the engine, their text back to the client whole or as Server-Sent Events


class Job:
    """One API call: n sequences for the engine from the same prompt, and the asyncio queue their text comes back on
    as (choice index, text, finish reason or None)."""

    def __init__(self, state, kind, ids, params, stop_ids, stops):
        self.kind, self.params, self.prompt_tokens = kind, params, len(ids)
        self.id, self.created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        self.object, self.model = "chat.completion" if kind == "chat" else "text_completion", state.name
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.sequences = [Sequence(ids, params.max_tokens, params.sampling, stop_ids, state.tokenizer, stops,
                                   None if params.seed is None else params.seed + i, (self.loop, self.events, i))
                          for i in range(params.n)]

    def usage(self):
        new = sum(len(s.tokens) for s in self.sequences)
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=new, total_tokens=self.prompt_tokens + new)

    def choice(self, i, text, finish, delta):
        if self.kind == "completion":
            return dict(index=i, text=text, finish_reason=finish, logprobs=None)
        content = dict(content=text) if delta else dict(role="assistant", content=text)
        return dict(index=i, finish_reason=finish, logprobs=None, **{"delta" if delta else "message": content})

    def chunk(self, choices, **extra):
        """One Server-Sent Event."""
        data = dict(id=self.id, object=self.object + ".chunk" * (self.kind == "chat"), created=self.created,
                    model=self.model, choices=choices)
        return f"data: {json.dumps(dict(data, **extra))}\n\n"

    def cancel(self):
        for s in self.sequences:
            s.cancelled = True  # its row is freed at the engine's next step


def deliver(events):
    """The engine's events of one step to the HTTP side: one wake-up of each event loop per step."""
    loops = {}
    for sequence, _, text in events:
        loop, queue_, i = sequence.owner
        loops.setdefault(loop, []).append((queue_, (i, text, sequence.finish)))
    for loop, items in loops.items():
        loop.call_soon_threadsafe(put_all, items)


def put_all(items):
    for queue_, item in items:
        queue_.put_nowait(item)


async def watch(request, job):
    """A client gone before the end: a None among the events ends the response."""
    while not await request.is_disconnected():
        await asyncio.sleep(1.0)
    job.events.put_nowait(None)


async def results(request, job):
    """(i, text, finish) as the engine makes them, until every choice has finished (or the client has gone)."""
    left, watcher = job.params.n, asyncio.create_task(watch(request, job))
    try:
        while left:
            event = await job.events.get()
            if event is None:
                return
            i, text, finish = event
            if finish and finish.startswith("error"):
                raise ApiError(500, f"generation failed ({finish})", kind="server_error")
            left -= finish is not None
            yield i, text, finish
    finally:
        watcher.cancel()


async def whole(request, job):
    texts, finishes = [""] * job.params.n, [None] * job.params.n
    try:
        async for i, text, finish in results(request, job):
            texts[i] += text
            finishes[i] = finish
    finally:
        job.cancel()  # a client gone before the end frees its rows
    return JSONResponse(dict(id=job.id, object=job.object, created=job.created, model=job.model, usage=job.usage(),
                             choices=[job.choice(i, texts[i], finishes[i], False) for i in range(job.params.n)]))


async def stream(request, job):
    try:
        if job.kind == "chat":
            yield job.chunk([dict(index=i, delta=dict(role="assistant", content=""), finish_reason=None)
                             for i in range(job.params.n)])
        async for i, text, finish in results(request, job):
            if text or finish:
                yield job.chunk([job.choice(i, text, finish, True)])
        if job.params.include_usage:
            yield job.chunk([], usage=job.usage())
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield f"data: {json.dumps(e.body)}\n\n"
    finally:
        job.cancel()  # a disconnect mid-stream frees the rows at the next step


async def respond(request, kind, ids, params, stop_ids, stops):
    """Queue the call's sequences on the engine; the response, streamed or whole."""
    state = request.app.state
    if state.waiting.qsize() + params.n > state.settings["max_queue"]:
        raise ApiError(429, "the server is busy; retry in a moment", kind="rate_limit_error")
    job = Job(state, kind, ids, params, stop_ids, stops)
    for s in job.sequences:
        state.waiting.put(s)
    if not params.stream:
        return await whole(request, job)
    return StreamingResponse(stream(request, job), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


# -----------------------------------------------------------------------------
# routes


def known(tokenizer, text):
    """A character vocabulary leaves out what it lacks (chat.py does the same)."""
    return tokenizer.known(text)[0] if hasattr(tokenizer, "known") else text


def recommended(tokenizer):
    """The model's recommended sampling (its generation_config.json): what a request leaves out."""
    return (getattr(tokenizer, "meta", None) or {}).get("generation", {})


async def chat_completions(request: Request):
    state, body = request.app.state, await read_body(request)
    s = state.settings
    messages = [dict(m, content=known(state.tokenizer, m["content"]))
                for m in messages_of(body, s["max_messages"], s["max_chars"])]
    params = params_of(body, s["max_tokens_limit"], recommended(state.tokenizer))
    try:
        ids, _, _ = fit_conversation(state.template, messages, max(state.block - params.max_tokens, state.block // 2))
    except ValueError as e:  # a template that refuses the conversation
        raise ApiError(400, str(e), "messages") from None
    return await respond(request, "chat", ids, params, state.template.stop_ids,
                         list(state.template.stop_strings) + params.stops)


async def completions(request: Request):
    state, body = request.app.state, await read_body(request)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string", "prompt")
    if len(prompt) > state.settings["max_chars"]:
        raise ApiError(400, f"the prompt holds more than {state.settings['max_chars']:,} characters", "prompt")
    ids = encode_prompt(state.tokenizer, known(state.tokenizer, prompt))  # as sample.py primes it
    stop_ids = [state.tokenizer.eos_id] if state.tokenizer.eos_id is not None else []
    params = params_of(body, state.settings["max_tokens_limit"], recommended(state.tokenizer))
    return await respond(request, "completion", ids, params, stop_ids, params.stops)


async def models(request: Request):
    return dict(object="list", data=[dict(id=request.app.state.name, object="model", created=int(time.time()),
                                          owned_by="yoctogpt", context_length=request.app.state.block)])


async def health(request: Request):
    state = request.app.state
    return dict(status="ok", model=state.name, active=len(state.engine.live), waiting=state.waiting.qsize())


async def page():
    return FileResponse(os.path.join(HERE, "serve.html"), media_type="text/html")


async def api_error(request, e):
    return JSONResponse(e.body, status_code=e.status)


async def http_error(request, e):  # 404, 405: OpenAI's shape too
    return await api_error(request, ApiError(e.status_code, str(e.detail)))


async def validation_error(request, e):
    return await api_error(request, ApiError(400, "the request does not match the API"))


async def internal_error(request, e):  # a bug, not bad input: one line in the log, a 500 to the client
    print(f"error: {type(e).__name__}: {str(e)[:200]} ({request.url.path})", file=sys.stderr)
    return await api_error(request, ApiError(500, "the server failed on this request", kind="server_error"))


def make_app(engine, waiting, tokenizer, settings):
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health and the chat page at /."""
    app = FastAPI(title="yoctoGPT", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(guard)])
    app.state.engine, app.state.waiting, app.state.tokenizer, app.state.settings = engine, waiting, tokenizer, settings
    app.state.template = template_for(getattr(tokenizer, "meta", None), tokenizer)
    app.state.block, app.state.name = engine.block, settings["model_name"]
    app.state.key = settings["api_key"] or os.environ.get("YOCTOGPT_API_KEY", "")
    for kind, handler in ((ApiError, api_error), (HTTPException, http_error),
                          (RequestValidationError, validation_error), (Exception, internal_error)):
        app.add_exception_handler(kind, handler)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/v1/completions")(completions)
    app.get("/v1/models")(models)
    app.get("/health")(health)
    app.get("/")(page)
    return app


def main():
    config, _ = configure(globals())
    check(config, dict(RULES, port=(lambda v: 0 <= v <= 65535, "a port in [0, 65535]"), max_batch=POSITIVE,
                       max_queue=POSITIVE, max_tokens_limit=POSITIVE, max_messages=POSITIVE, max_chars=POSITIVE,
                       max_body=POSITIVE))
    if FastAPI is None:  # before the model loads
        die("serve.py needs FastAPI and uvicorn: pip install fastapi uvicorn")
    try:  # the port, before the model loads into a server that could not listen
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        die(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port (or --host)")
    model, tokenizer = load_for_inference(config, announce=True)
    config["model_name"] = model_name or os.path.basename(os.path.normpath(source_of(config).removeprefix("hf:")))
    engine = Engine(model, max_batch, compile_decode(model) if config["compile"] else None)
    if config["compile"]:
        engine.warm_up()
    waiting = queue.Queue()
    app = make_app(engine, waiting, tokenizer, config)
    print(f"serving {config['model_name']} ({num_weights(model) / 1e6:.1f}M parameters, context "
          f"{model.config.block_size}) at http://{host}:{port} — OpenAI API at /v1, chat page at /", flush=True)
    if recommended(tokenizer):
        print("requests that leave them out sample as the model's generation_config.json recommends: "
              + ", ".join(f"{k}={v}" for k, v in recommended(tokenizer).items()), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error", access_log=False))
    # the engine keeps the main thread: torch's CPU thread pool runs ~2x slower from another thread while the main
    # one's pool waits, so the HTTP server gets the other thread
    http = threading.Thread(target=server.run, daemon=True, name="http")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or SIGTERM: stop decoding, close the server, exit 0
        signal.signal(sig, lambda *_: stop.set())
    gc.freeze()  # what start-up made stays out of the collector: a full collection stalled decoding mid-load
    http.start()
    engine.serve(waiting, stop, deliver)
    server.should_exit = True
    http.join(timeout=10)
    print("stopped serving", file=sys.stderr)


if __name__ == "__main__":
    main()
