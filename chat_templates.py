"""
Chat templates: how a conversation becomes token ids, the same in training and at inference. Our own turn template
(<|user|> ... <|end|> on a BPE, ␄-ended turns on characters, plain "User: " lines on GPT-2's tokens), a model's own
Jinja template (imported with it from the hub), and a plain transcript for base models; the per-token loss mask of
SFT, the end-of-turn ids a reply stops at, and a conversation cut to fit the context. Not run by itself.
"""

import json
from datetime import datetime

from errors import die

ROLES = ("system", "user", "assistant")
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # reserved in every BPE prepare_bpe.py trains
TEXT_MARKERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}  # GPT-2's and characters' template
CHAR_END = "\u2404"  # ␄: ends a turn in a character model's template


def make_template(tokenizer, kind):
    """The chat template for a tokenizer, recorded in meta.json and carried by checkpoints: each role's marker as
    token ids and the id that ends a turn. Our BPE: its reserved special tokens (never produced by text); GPT-2's
    fixed vocabulary: text markers and <|endoftext|>; characters: text markers and ␄."""
    if kind == "bpe":  # (prepare_bpe.py adds the tokens to an older tokenizer first)
        ids = [tokenizer.tok.token_to_id(t) for t in CHAT_TOKENS]
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        markers = {r: [i] for r, i in zip(ROLES, ids, strict=False)}
        return TurnTemplate(tokenizer, dict(style="special tokens", markers=markers, end=CHAT_TOKENS[-1],
                                            end_id=ids[-1], bos=bos))
    end = "<|endoftext|>" if kind == "gpt2" else CHAR_END
    markers = {r: tokenizer.encode(t) for r, t in TEXT_MARKERS.items()}
    end_id = tokenizer.eos_id if kind == "gpt2" else tokenizer.encode(CHAR_END)[0]
    return TurnTemplate(tokenizer, dict(style="text", markers=markers, end=end, bos=[], end_id=end_id))


def jinja(template):
    """The template as Hugging Face's `chat_template` (Jinja) for an exported tokenizer, so transformers'
    apply_chat_template gives the ids render() gives."""
    marks = dict(zip(ROLES, CHAT_TOKENS, strict=False)) if template["style"] == "special tokens" else TEXT_MARKERS
    return ("{{ bos_token }}" if template["bos"] else "") + f"{{% set marks = {json.dumps(marks)} %}}" + (
        "{% for m in messages %}{{ marks[m['role']] }}{{ m['content'] }}" + template["end"] + "{% endfor %}"
        "{% if add_generation_prompt %}{{ marks['assistant'] }}{% endif %}")


class Template:
    """How a conversation (a list of {role, content}) becomes the model's tokens, as in training: render() gives the
    text, encode() its ids with special tokens parsed (as transformers' apply_chat_template does); a reply ends at
    one of stop_ids, or in a plain transcript at one of stop_strings."""
    stop_strings = ()

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids = tokenizer, sorted({i for i in stop_ids if i is not None})

    def encode(self, messages, add_generation_prompt=False):
        return self.tokenizer.encode_chat(self.render(messages, add_generation_prompt))

    def encode_masked(self, messages):
        """(ids, loss mask) of a whole conversation: 1 on each assistant reply and what ends it, as rendered. The
        text between replies is encoded apart from them, so a reply starts with the token generation would start
        with after the rendered prompt."""
        text, pieces, pos = self.render(messages), [], 0
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                before, upto = self.render(messages[:i], True), self.render(messages[:i + 1])
                if not (upto.startswith(before) and text.startswith(upto) and len(before) >= pos):
                    raise ValueError("the chat template does not render a conversation as its turns one after "
                                     "another, so the replies cannot be told apart for the loss mask")
                pieces += [(text[pos:len(before)], 0), (upto[len(before):], 1)]
                pos = len(upto)
        pieces.append((text[pos:], 0))
        ids, mask = [], []
        for piece, keep in pieces:
            piece_ids = self.tokenizer.encode_chat(piece) if piece else []
            ids += piece_ids
            mask += [keep] * len(piece_ids)
        return ids, mask


class JinjaTemplate(Template):
    """A model's own chat template (Jinja, from its tokenizer_config.json or chat_template.jinja), rendered as
    transformers renders it: a sandboxed environment with trim_blocks and lstrip_blocks, the tokenizer's special
    tokens as variables, raise_exception and tojson."""

    def __init__(self, source, tokenizer, stop_ids, specials):
        super().__init__(tokenizer, stop_ids)
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            die("this model's chat template is Jinja, which needs jinja2: pip install jinja2")

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template is not valid Jinja ({e})") from None
        self.source, self.specials, self.errors = source, specials, jinja2.exceptions.TemplateError

    def render(self, messages, add_generation_prompt=False):
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                        documents=None, **self.specials)
        except self.errors as e:  # raise_exception() in the template: roles that must alternate, say
            raise ValueError(f"the chat template refuses this conversation ({e})") from None

    name = "the model's own"

    def meta(self):
        return dict(chat_template=self.source, stop_ids=self.stop_ids, special_tokens=self.specials)


class TurnTemplate(Template):
    """Our own template (make_template's, carried in meta.json): each message is its role's marker, its text and the
    end token, encoded piece by piece, so text typed in a message never becomes a marker or the end token."""

    def __init__(self, tokenizer, spec):
        super().__init__(tokenizer, [spec["end_id"]])
        self.spec = spec

    def render(self, messages, add_generation_prompt=False):
        return self.tokenizer.decode(self.encode(messages, add_generation_prompt))

    def encode(self, messages, add_generation_prompt=False):
        return self.encode_masked(messages)[0] + (self.spec["markers"]["assistant"] if add_generation_prompt else [])

    def encode_masked(self, messages):
        ids, mask = list(self.spec["bos"]), [0] * len(self.spec["bos"])
        for m in messages:
            marker, body = self.spec["markers"][m["role"]], self.tokenizer.encode(m["content"]) + [self.spec["end_id"]]
            ids += marker + body
            mask += [0] * len(marker) + [int(m["role"] == "assistant")] * len(body)
        return ids, mask

    @property
    def name(self):
        return self.spec["style"]

    def meta(self):
        return dict(chat_template=self.spec)


class Transcript(Template):
    """A base model's plain transcript: the system prompt on its first line, then `User: ...` and `Assistant: ...`
    lines; a reply ends at EOS or where the model starts the next turn."""

    def __init__(self, tokenizer, user_prefix="User: ", assistant_prefix="Assistant: "):
        super().__init__(tokenizer, [tokenizer.eos_id])
        self.prefixes = dict(system="", user=user_prefix, assistant=assistant_prefix)
        self.stop_strings = ["\n" + p.strip() for p in (user_prefix, assistant_prefix)]

    def render(self, messages, add_generation_prompt=False):
        text = "".join(f"{self.prefixes[m['role']]}{m['content']}\n" for m in messages)
        return text + (self.prefixes["assistant"].rstrip(" ") if add_generation_prompt else "")

    def encode(self, messages, add_generation_prompt=False):  # BOS first; the text is text, whatever it holds
        bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        return bos + self.tokenizer.encode(self.render(messages, add_generation_prompt))


def fit_conversation(template, messages, budget):
    """The ids of messages rendered for a reply, cut to fit `budget` tokens: the oldest messages after the system
    ones go first (never leaving an assistant message first); a last message too long on its own loses its start,
    the system prompt stays. Returns (ids, messages dropped, tokens cut). chat.py and serve.py both cut this way."""
    system = [m for m in messages if m["role"] == "system"][:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    for first in range(len(turns)):
        if first and turns[first]["role"] == "assistant":
            continue
        ids = template.encode(system + turns[first:], add_generation_prompt=True)
        if len(ids) <= budget:
            return ids, first, 0
    head = len(template.encode(system)) if system else 0
    cut = len(ids) - budget
    return ids[:head] + ids[head + cut:], len(turns) - 1, cut


def template_for(meta, tokenizer, user_prefix="User: ", assistant_prefix="Assistant: "):
    """The template a checkpoint (or dataset) was trained with: ours, the imported model's own, or for a base model
    the plain transcript."""
    spec = (meta or {}).get("chat_template")
    if isinstance(spec, dict):
        return TurnTemplate(tokenizer, spec)
    if isinstance(spec, str):
        stops = meta.get("stop_ids") or [tokenizer.eos_id]
        return JinjaTemplate(spec, tokenizer, stops, meta.get("special_tokens", {}))
    return Transcript(tokenizer, user_prefix, assistant_prefix)


