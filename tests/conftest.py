"""Shared helpers: run a yoctoGPT script as a user would (its __main__ in a scratch folder), and a
small character dataset prepared once per test session."""

import contextlib
import gc
import io
import os
import runpy
import signal
import subprocess
import sys
import traceback

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a tiny model and run that trains in a few seconds on a CPU
TINY = ["--gradient_accumulation_steps=1", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=4", "--log_interval=1", "--warmup_iters=5", "--learning_rate=3e-3",
        "--min_lr=3e-4", "--device=cpu"]


def run(script, *args, cwd, ok=True, input=None, env=None, fresh=False):
    """Run `python script args...` in cwd as a user would and assert its exit status (0 if ok, else non-zero
    with no traceback). It runs in this process (runpy: the script's __main__ with its argv, cwd, stdin,
    stdout and stderr; 2-3 s faster than a new interpreter importing torch) unless fresh=True or env is
    given, which need a new interpreter (environment variables read at import time)."""
    path = os.path.join(ROOT, script)
    if fresh or env:
        proc = subprocess.run([sys.executable, path, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                              input=input, timeout=600, env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})})
    else:
        proc = run_here(path, [str(a) for a in args], cwd, input)
    if ok:
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    else:
        assert proc.returncode != 0, f"{script} should have failed:\n{proc.stdout[-2000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def run_here(path, args, cwd, input):
    """runpy the script as __main__; exit status and output as subprocess.run would report them."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = os.getcwd(), sys.argv, sys.stdin, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.chdir(cwd)
    sys.argv, sys.stdin = [path, *args], io.StringIO(input or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:  # sys.exit("error: ...") prints the message and exits 1, as the interpreter does
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    except BaseException:  # what a user would see as a traceback
        err.write(traceback.format_exc())
        code = 1
    finally:
        os.chdir(saved[0])
        sys.argv, sys.stdin = saved[1], saved[2]
        for sig, handler in saved[3].items():
            signal.signal(sig, handler)
        gc.collect()  # the script's globals: its open files (train.py's out_dir lock) close as at a process's end
    return subprocess.CompletedProcess([path, *args], code, out.getvalue(), err.getvalue())


def corpus_text():
    """~40 KB of Python's reference docs: real text, fast to train on."""
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    return "".join(topics[k] for k in sorted(topics))[:40000]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A scratch folder holding data/tiny_char, prepared once."""
    d = tmp_path_factory.mktemp("work")
    (d / "tiny.txt").write_text(corpus_text(), encoding="utf-8")
    run("prepare_char.py", "--input=tiny.txt", cwd=d)
    return d


@pytest.fixture(scope="session")
def trained(workdir):
    """workdir with out-tiny: a tiny char model trained for 60 iterations, shared by the sample and chat tests."""
    if not (workdir / "out-tiny" / "ckpt.pt").exists():
        run("train.py", "--dataset=tiny_char", "--out_dir=out-tiny", "--max_iters=60", "--eval_interval=60", *TINY,
            cwd=workdir)
    return workdir


def load(out_dir, **settings):
    """(model, tokenizer) of a run folder on the CPU, as sample.py loads it (inference.load_for_inference)."""
    from inference import LOAD_DEFAULTS, load_for_inference
    return load_for_inference(dict(LOAD_DEFAULTS, out_dir=str(out_dir), device="cpu", **settings))


def greedy_text(out_dir, prompt, max_new_tokens, **settings):
    """What `sample.py --temperature=0` prints for a prompt: the prompt, the engine's greedy continuation of it (in
    this process, on the model as sample.py loads it; up to EOS), then a newline."""
    from generate import Sequence, generate_stream
    from tokenizer import encode_prompt
    model, tok = load(out_dir, **settings)
    reply = Sequence(encode_prompt(tok, prompt), max_new_tokens, dict(temperature=0),
                     [tok.eos_id] if tok.eos_id is not None else [], tok)
    for _ in generate_stream(model, [reply]):
        pass
    return prompt + reply.text + "\n"
