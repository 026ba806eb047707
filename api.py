"""
OpenAI's chat and completions API in our terms, for serve.py: a request's fields checked one by one as the API defines
them (sampling, stop strings, messages), each bad one an ApiError with its HTTP status and OpenAI's error shape.
Torch-free and HTTP-free. Not run by itself.
"""

import math
from dataclasses import dataclass

UNSUPPORTED = ("logprobs", "tools", "functions", "response_format", "logit_bias", "echo", "suffix")


class ApiError(Exception):
    """A request the API refuses: an HTTP status and OpenAI's error shape."""

    def __init__(self, status, message, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": None}}


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


@dataclass
class Params:
    """The checked fields both endpoints share."""
    sampling: dict  # sample_next's controls
    max_tokens: int
    stops: list  # stop strings
    seed: int | None
    n: int  # choices
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def params_of(body, limit, defaults=None):
    """The sampling fields of a request, checked, those it leaves out from defaults (the model's recommended
    sampling) or the API's; ApiError (400) naming the first bad one."""
    body = {**(defaults or {}), **{k: v for k, v in body.items() if v is not None}}
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise ApiError(400, f"{name} is not supported; use repetition_penalty (> 1 lowers repeated tokens)", name)
    for name in UNSUPPORTED:
        if body.get(name):
            raise ApiError(400, f"{name} is not supported by this server", name)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = number(dict(max_tokens=max_tokens), "max_tokens", min(512, limit), 1, limit, int)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    sampling = dict(temperature=number(body, "temperature", 1.0, 0, 2),
                    top_p=number(body, "top_p", 1.0, 0, 1, low_open=True),
                    top_k=number(body, "top_k", 0, 0, 1 << 31, int) or None, min_p=number(body, "min_p", 0.0, 0, 1),
                    repetition_penalty=number(body, "repetition_penalty", 1.0, 0, 100, low_open=True))
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    return Params(sampling, max_tokens, stops, number(body, "seed", None, 0, 2**63 - 1, int),
                  number(body, "n", 1, 1, 8, int), body.get("stream", False), bool(options.get("include_usage")))


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
