"""chat.py: scripted (piped) sessions, context cutting, stop strings, and a real terminal session."""

import fcntl
import os
import select
import subprocess
import sys
import termios
import time

import pytest
import torch

import chat as chat_module
from chat import Chat
from conftest import ROOT, run
from tokenizer import CharTokenizer, held_back


def chat_settings(**changes):
    """chat.py's settings as Chat takes them, with the defaults of a test."""
    return dict(dict(system_prompt="", user_prefix="User: ", assistant_prefix="Assistant: ", max_new_tokens=100,
                     temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                     seed=1, dtype="float32"), **changes)


def test_piped_session_turns_commands_and_transcript(trained):
    """The model's context is 32 characters: with 4 for the reply, the second turn no longer has room for the first,
    which is dropped with a note; /history shows exactly what the model saw, and its reply."""
    script = "/set temperature=0\n/set max_new_tokens=4\nhi\nlist\n/history\n/reset\n/history\nbye\n/exit\nnot read\n"
    out = run("chat.py", "--out_dir=out-tiny", "--system_prompt=D", "--device=cpu", input=script, cwd=trained).stdout
    assert "You:" not in out  # no prompt decoration when stdin is not a terminal
    assert "(temperature = 0.0)" in out and "(max_new_tokens = 4)" in out
    history = out.split("(max_new_tokens = 4)\n")[1]
    assert "(note: the 2 oldest messages no longer fit in the model's 32-token context" in history
    seen = history.split("does not see them)\n")[1].split("(conversation cleared)")[0]
    assert "D\nUser: list\nAssistant:" in seen and "User: hi" not in seen
    assert out.split("(conversation cleared)\n")[1].startswith("D\n")  # after /reset: the system prompt alone
    assert "not read" not in out
    # greedy replies are reproducible
    again = run("chat.py", "--out_dir=out-tiny", "--system_prompt=D", "--device=cpu", input=script, cwd=trained).stdout
    assert again.split("(max_new_tokens = 4)\n")[1] == history


def test_unknown_characters_are_left_out_with_a_note_and_the_turn_is_answered(trained):
    proc = run("chat.py", "--out_dir=out-tiny", "--max_new_tokens=5", input="snow ☃\n/history\n", cwd=trained)
    assert "☃" in proc.stderr and "left out" in proc.stderr and "Traceback" not in proc.stderr
    assert "User: snow \nAssistant:" in proc.stdout


def test_the_context_keeps_the_system_prompt_and_the_newest_turns():
    """Old turns go first, whole; a message too long on its own loses its start; the system prompt stays."""
    tok = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyzSUA:! \n")))
    notes = []
    settings = chat_settings(system_prompt="S", max_new_tokens=30)  # block 80: 50 tokens for the conversation
    chat = Chat(ScriptedModel(tok, " ok", block_size=80), tok, settings, write=notes.append)
    chat.turns = [("aaaa", "ok"), ("bbbb", "ok"), ("cccc", "ok")]
    assert tok.decode(chat.prompt_ids("dddd")) == "S\nUser: cccc\nAssistant: ok\nUser: dddd\nAssistant:"
    assert notes == ["(note: the 4 oldest messages no longer fit in the model's 80-token context; it does not see "
                     "them)\n"]  # said once, while no more drop out
    assert chat.prompt_ids("dddd") and len(notes) == 1
    ids = chat.prompt_ids("z" * 50)  # 69 tokens alone: its first 19 go
    assert tok.decode(ids) == "S\n" + "z" * 37 + "\nAssistant:" and "first 19 tokens were left out" in notes[-1]


def test_long_history_is_cut_to_the_block(trained):
    """Many turns: every prompt still fits block_size minus the reply, the system prompt stays first."""
    from conftest import load
    model, tok = load(str(trained / "out-tiny"))
    settings = chat_settings(system_prompt="S", max_new_tokens=8, temperature=0.0)
    chat = Chat(model, tok, settings, write=lambda s: None)
    for i in range(6):
        chat.reply(f"t{i}")
        ids = chat.prompt_ids("x")  # block_size 32: room for the system prompt and the newest turn or two
        assert len(ids) <= model.config.block_size - 8
        text = tok.decode(ids)
        assert text.startswith("S\n") and text.endswith("User: x\nAssistant:") and "User: t0" not in text


class ScriptedModel(torch.nn.Module):
    """Stands in for GPT: 'generates' a fixed text, one character token at a time."""

    def __init__(self, tok, text, block_size=256):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.text = tok, text
        self.config = type("C", (), {"block_size": block_size})

    def generate_stream(self, sequences, decode=None, generator=None):
        reply = sequences[0]
        for i in self.tok.encode(self.text):
            yield reply, i, reply.add(i)
            if reply.finish:
                return


@pytest.fixture(autouse=True)
def scripted_streams(monkeypatch):
    """Chat streams through generate.generate_stream; a ScriptedModel streams its own text instead."""
    real = chat_module.generate_stream
    monkeypatch.setattr(chat_module, "generate_stream", lambda model, *a, **kw: (
        model.generate_stream(*a, **kw) if isinstance(model, ScriptedModel) else real(model, *a, **kw)))


def test_stop_strings_cut_the_reply_and_are_never_printed():
    tok = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyzSUA:! \n")))
    printed = []
    settings = chat_settings(system_prompt="", max_new_tokens=100, temperature=1.0)
    chat = Chat(ScriptedModel(tok, " sure thing!\nUser: and more\nUser: x"), tok, settings, write=printed.append)
    assert chat.reply("hi") == "sure thing!"
    assert "".join(printed) == " sure thing!\n" and chat.turns == [("hi", "sure thing!")]
    assert held_back("abc\nUs", ["\nUser:"]) == 3 and held_back("abc", ["\nUser:"]) == 0


def test_interactive_terminal_session(trained):
    """A person at a terminal: the prompt shows, a reply streams, Ctrl-C at the prompt clears the line and keeps
    the conversation, /exit leaves cleanly."""
    master, slave = os.openpty()
    command = [sys.executable, os.path.join(ROOT, "chat.py"), "--out_dir=out-tiny", "--max_new_tokens=20"]
    proc = subprocess.Popen(command, cwd=trained, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            # the pty is its terminal
                            preexec_fn=lambda: (os.setsid(), fcntl.ioctl(0, termios.TIOCSCTTY, 0)))
    os.close(slave)
    seen = b""

    def read_until(marker, count=1, timeout=60):
        nonlocal seen
        end = time.time() + timeout
        while seen.count(marker) < count and time.time() < end:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        return seen.count(marker) >= count

    try:
        assert read_until(b"You: "), seen
        os.write(master, b"hello\n")
        assert read_until(b"You: ", 2), seen
        os.write(master, b"half a line")
        assert read_until(b"half a line"), seen  # echoed: readline has the terminal
        # Ctrl-C at the prompt: clears the line, keeps the conversation. A key pressed while readline is still
        # drawing the echo is taken by readline's own handler and only acted on at the next key, so, like a
        # person, press it again if nothing happened.
        for _ in range(5):
            time.sleep(0.2)
            os.write(master, b"\x03")
            if read_until(b"(Ctrl-D or /exit to leave)", timeout=5):
                break
        assert read_until(b"You: ", 3), seen
        os.write(master, b"/history\n")
        assert read_until(b"You: ", seen.count(b"You: ") + 1), seen
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)
    history = seen.split(b"/history")[-1]
    assert b"hello\r\nAssistant:" in history and b"half a line" not in history  # the turn before Ctrl-C is still there
    assert b"Assistant: " in seen and b"/help" in seen and b"Traceback" not in seen


def test_quick_start_context_keeps_recent_turns_and_says_when_old_ones_drop():
    """The quick-start shape (block 256, max_new_tokens 200): half the block stays for the conversation, so a
    long chat keeps its newest turns, says when older ones drop out, and a normal message is never cut."""
    tok = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyzSUA:!? \n")))
    printed = []
    settings = chat_settings(system_prompt="", max_new_tokens=200, temperature=1.0)
    chat = Chat(ScriptedModel(tok, " sure thing!\nUser: x"), tok, settings, write=printed.append)
    for letter in "abcdefgh":
        chat.reply(f"what is a list {letter}?")
    text = tok.decode(chat.prompt_ids("and a dict?"))
    notes = [p for p in printed if p.startswith("(note")]
    assert len(text) <= 128 and notes and all("no longer fit" in n for n in notes)
    assert text.endswith("User: and a dict?\nAssistant:") and "list h?\nAssistant: sure thing!" in text
    assert "list a?" not in text
