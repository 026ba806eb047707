"""Shared helpers: run a yoctoGPT script as a user would (a subprocess in a scratch folder), and a
small character dataset prepared once per test session."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a tiny model and run that trains in a few seconds on a CPU
TINY = ["--gradient_accumulation_steps=1", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=4",
        "--log_interval=1", "--warmup_iters=5", "--learning_rate=3e-3", "--min_lr=3e-4", "--device=cpu"]


def run(script, *args, cwd, ok=True, input=None, env=None):
    """Run `python script args...` in cwd; assert its exit status (0 if ok, else non-zero)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, input=input, timeout=600,
                          env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})})
    if ok:
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    else:
        assert proc.returncode != 0, f"{script} should have failed:\n{proc.stdout[-2000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc


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
        run("train.py", "--dataset=tiny_char", "--out_dir=out-tiny", "--max_iters=60", "--eval_interval=60", *TINY, cwd=workdir)
    return workdir
