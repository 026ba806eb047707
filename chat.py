"""
Chat with a trained model in the terminal: replies stream as they are sampled, the conversation is
kept as `User: ...` / `Assistant: ...` turns cut to fit the context, and /commands adjust it.
Piped stdin works too (one user turn per line, replies printed plainly), so chats can be scripted.

    python chat.py                                   # the quick start's model (out-char-tiny)
    python chat.py --out_dir=out-bpe-small --system_prompt="A conversation about Python." --temperature=0.7
    printf 'hello\\n/set temperature=0\\nwhat is a list?\\n' | python chat.py
"""

import difflib
import math
import signal
import sys
from contextlib import contextmanager

import torch

from chat_templates import fit_conversation, template_for
from configurator import check, configure, declare
from errors import die
from generate import (
    DECODE_SETTINGS,
    SAMPLING_RULES,
    SAMPLING_SETTINGS,
    Sequence,
    compile_decode,
    generate_stream,
    sampling_of,
)
from inference import LOAD_SETTINGS, load_for_inference, source_of
from quantize import num_weights

# -----------------------------------------------------------------------------
RULES = declare(globals(), LOAD_SETTINGS, SAMPLING_SETTINGS, DECODE_SETTINGS)  # out_dir, init_from, temperature, ...
max_new_tokens = 200  # longest reply, in tokens
system_prompt = ""  # text kept at the top of every prompt (never cut)
user_prefix = "User: "  # how a user turn starts in the transcript (a model without a chat template)
assistant_prefix = "Assistant: "  # how a reply starts in the transcript (a model without a chat template)
# -----------------------------------------------------------------------------

SETTABLE = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size", "max_new_tokens",
            "seed")
INTEGERS = ("top_k", "no_repeat_ngram_size", "max_new_tokens", "seed")
HELP = """commands:
  /exit            leave (also Ctrl-D; Ctrl-C stops a reply, or clears the line at the prompt)
  /reset           forget the conversation
  /history         show the transcript as the model sees it
  /set KEY=VALUE   change temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size,
                   max_new_tokens or seed
  /help            this text"""


class Chat:
    """A conversation: with a chat template (a model fine-tuned on conversations, see sft.py) turns are rendered
    as in training and a reply ends at the template's end token; a base model continues a plain transcript of
    `User: ...` / `Assistant: ...` lines, its reply ending where it starts the next turn."""

    def __init__(self, model, tokenizer, settings, write):
        self.model, self.tokenizer, self.s, self.write = model, tokenizer, settings, write
        self.decode = compile_decode(model) if settings.get("compile") else None
        self.turns = []  # (user message, reply) pairs
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(settings["seed"])
        self.template = template_for(getattr(tokenizer, "meta", None), tokenizer, settings["user_prefix"],
                                     settings["assistant_prefix"])
        self.seen, self.dropped = [], 0  # the ids of the last prompt and reply; messages the context left out

    def messages(self, pending=None):
        """The conversation as (system messages, turn messages), `pending` (a new user message) last."""
        system = [dict(role="system", content=self.s["system_prompt"])] if self.s["system_prompt"] else []
        turns = [dict(role=r, content=c) for u, a in self.turns for r, c in (("user", u), ("assistant", a))]
        return system, turns + ([dict(role="user", content=pending)] if pending is not None else [])

    def transcript(self):
        """Token ids of the whole conversation so far, rendered (not cut to the context)."""
        system, turns = self.messages()
        return self.template.encode(system + turns)

    def prompt_ids(self, message):
        """The conversation and the new message, rendered for a reply and cut to fit block_size with room for the
        reply (sft.fit_conversation), with a note for what no longer fits."""
        system, turns = self.messages(message)
        block = self.model.config.block_size
        budget = max(block - self.s["max_new_tokens"], block // 2)
        ids, dropped, cut = fit_conversation(self.template, system + turns, budget)
        if dropped > self.dropped:  # on a line of its own, before the reply starts
            self.write(f"(note: the {dropped} oldest messages no longer fit in the model's {block}-token context; it "
                       f"does not see them)\n")
        self.dropped = dropped
        if cut:
            self.write(f"(note: your message is longer than the {budget} tokens of context left for it; its first "
                       f"{cut} tokens were left out)\n")
        return ids

    def reply(self, message):
        """Stream the model's reply to message; return the reply text (cut at a stop string)."""
        if hasattr(self.tokenizer, "known"):  # a character vocabulary: leave out what it lacks, and say so
            message, missing = self.tokenizer.known(message)
            if missing:
                print(f"(note: left out characters the model does not know: {' '.join(map(repr, missing))})",
                      file=sys.stderr)
        try:
            ids = self.prompt_ids(message)
        except ValueError as e:  # a template that refuses the turn
            print(f"(skipped: {e})", file=sys.stderr)
            return None
        s, stopped = self.s, ""
        reply = Sequence(ids, s["max_new_tokens"], sampling_of(s), self.template.stop_ids, self.tokenizer,
                         self.template.stop_strings)
        self.write(s["assistant_prefix"] if s.get("interactive") else "")
        try:
            with keys_held(s.get("interactive")):
                for _, _, text in generate_stream(self.model, [reply], self.decode, self.generator):
                    self.write(text)
        except KeyboardInterrupt:  # Ctrl-C stops this reply only
            stopped = " (stopped)"
        self.write(reply.stream.flush() + stopped + "\n")
        self.seen = reply.ids  # what /history shows: the context the model saw, and its reply (with its end token)
        text = reply.text.strip()
        self.turns.append((message, text))
        return text

    def command(self, line):
        """Handle a /command; return False to leave."""
        cmd, _, arg = line.partition(" ")
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/reset":
            self.turns, self.seen, self.dropped = [], [], 0
            self.write("(conversation cleared)\n")
        elif cmd == "/history":  # what the model sees: the context of the last reply (cut to fit), and the reply
            text = self.tokenizer.decode_all(self.seen or self.template.encode(self.messages()[0]))
            self.write(text if text.endswith("\n") else text + "\n")
        elif cmd == "/set":
            key, eq, value = arg.strip().partition("=")
            if key not in SETTABLE or not eq:
                close = difflib.get_close_matches(key, SETTABLE, n=1, cutoff=0.6) if eq else []
                hint = f"no setting {key!r}; did you mean {close[0]}? " if close else ""
                self.write(f"({hint}usage: /set KEY=VALUE with KEY one of {', '.join(SETTABLE)})\n")
                return True
            kind = int if key in INTEGERS else float
            try:
                number = kind(value)
            except ValueError:
                self.write(f"(/set {key}: {value!r} is not {'an integer' if kind is int else 'a number'})\n")
                return True
            ok, must = SAMPLING_RULES.get(key, (lambda v: True, ""))
            if not (math.isfinite(number) and ok(number)):  # the same rules as the command line's
                self.write(f"(/set {key}={value}: it must be {must})\n")
                return True
            self.s[key] = number
            if key == "seed":
                self.generator.manual_seed(self.s["seed"])
            self.write(f"({key} = {self.s[key]})\n")
        elif cmd == "/help":
            self.write(HELP + "\n")
        else:
            self.write(f"(unknown command {cmd}; /help lists them)\n")
        return True


@contextmanager
def keys_held(active):
    """While a reply streams, keys typed are neither echoed (they would land in the middle of the reply) nor kept
    for the next prompt. POSIX terminals only; elsewhere a no-op."""
    try:
        import termios
        fd, saved = sys.stdin.fileno(), termios.tcgetattr(sys.stdin.fileno()) if active else None
    except (ImportError, OSError, ValueError):
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def main():
    config, explicit = configure(globals())
    check(config, RULES)
    config["interactive"] = interactive = sys.stdin.isatty()
    if interactive:  # Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (as from a script)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    source = source_of(config)
    model, tokenizer = load_for_inference(config)
    # the model's recommended sampling (its generation_config.json), for each setting not given here
    taken = {k: v for k, v in ((tokenizer.meta or {}).get("generation") or {}).items() if k not in explicit}
    config.update(taken)
    try:
        tokenizer.encode(system_prompt + user_prefix + assistant_prefix)
    except ValueError as e:  # once, here, rather than every turn
        die(f"--system_prompt or the turn prefixes have {e}; use characters the model knows")

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()
    chat = Chat(model, tokenizer, config, write)
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history where available)
        except ImportError:
            pass
        write(f"chatting with {source} ({num_weights(model) / 1e6:.1f}M parameters, context {model.config.block_size} "
              f"tokens). /help for commands, /exit to leave.\n")
        if taken:
            write("sampling as the model recommends (generation_config.json): " +
                  ", ".join(f"{k}={v}" for k, v in taken.items()) + "; /set or --KEY=VALUE changes it\n")
    while True:
        try:
            line = input("You: " if interactive else "")
        except EOFError:  # Ctrl-D
            if interactive:
                write("\n")
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line; the conversation stays
            write("\n(Ctrl-D or /exit to leave)\n" if interactive else "")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                break
            continue
        chat.reply(line)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        print("stopped before the chat started", file=sys.stderr)
        sys.exit(130)
