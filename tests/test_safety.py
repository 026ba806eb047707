"""Bad input, signals, crashes and two runs at once: every bad input is one line and a non-zero exit with no
traceback and no file changed; Ctrl-C and SIGTERM save and exit 130/143 with an exact resume; one run per out_dir;
metrics.csv stays ordered after a kill -9; a resumed run writes only to the out_dir it was started with."""

import csv
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, run

BASE = ["--dataset=tiny_char", *TINY]


@pytest.fixture(scope="module")
def safe(trained, tmp_path_factory):
    """A folder with a good dataset and run, and broken ones of every kind the matrix feeds the scripts."""
    d = tmp_path_factory.mktemp("safe")
    shutil.copytree(trained / "data" / "tiny_char", d / "data" / "tiny_char")
    shutil.copytree(trained / "out-tiny", d / "out-tiny")
    good = d / "data" / "tiny_char"
    meta = json.loads((good / "meta.json").read_text())
    for name, change in [("noval", lambda p: os.remove(p / "val.bin")),
                         ("badjson", lambda p: (p / "meta.json").write_text('{"tokenizer": "char", "vo')),
                         ("objdtype", lambda p: (p / "meta.json").write_text(json.dumps({**meta, "dtype": "object"}))),
                         ("bigid",
                          lambda p: (p / "meta.json").write_text(json.dumps({**meta, "vocab": meta["vocab"][:5],
                                                                                        "vocab_size": 5}))),
                         ("odd", lambda p: open(p / "train.bin", "ab").write(b"\x01"))]:
        shutil.copytree(good, d / "data" / f"{name}_char")
        change(d / "data" / f"{name}_char")
    (d / "afile").write_text("not a folder")
    os.makedirs(d / "out-corrupt")
    (d / "out-corrupt" / "ckpt.pt").write_bytes(b"PK\x03\x04 half a zip \x1b[31mred\x1b[0m")
    torch.save({"x": torch.zeros(1)}, d / "foreign.pt")
    (d / "empty.txt").write_text("")
    (d / "binary.bin").write_bytes(b"abc\x00\x01" * 100)
    (d / "latin1.txt").write_bytes("café ".encode("latin-1") * 100)
    (d / "text.txt").write_text("some text to prepare\n" * 200)
    (d / "fake.parquet").write_text("not parquet at all")
    (d / "nottok.json").write_text('{"hello": "world"}')
    os.makedirs(d / "hf-broken")
    (d / "hf-broken" / "config.json").write_text('{"model_type": "gpt2", "n_la')
    os.makedirs(d / "hf-wrongkind")
    (d / "hf-wrongkind" / "config.json").write_text('{"model_type": "bert", "vocab_size": 10}')
    run("prepare_bpe.py", "--input=text.txt", "--vocab_size=300", cwd=d)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"tokens": [[1, 2, 70000]]}), d / "tokens.parquet")
    except ImportError:
        pass
    return d


def digests(folder):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


T, S = ["train.py", *BASE, "--out_dir=out-bad", "--max_iters=2"], ["sample.py", "--out_dir=out-tiny"]
C, PC, PB, B = ["chat.py", "--out_dir=out-tiny"], ["prepare_char.py"], ["prepare_bpe.py"], ["bench.py"]
R = ["recommend.py", "--dataset=tiny_char", "--max_time=5"]
CASES = [  # (command, what the one line must name)
    *[(T + [f"--{k}={v}"], k) for k, v in [
        ("batch_size", 0), ("batch_size", -4), ("block_size", 0), ("eval_iters", 0), ("eval_interval", 0),
        ("log_interval", 0), ("max_iters", 0), ("max_iters", -1), ("warmup_iters", -1), ("max_time", -5),
        ("gradient_accumulation_steps", 0), ("learning_rate", -1e-3), ("min_lr", -1), ("eps", 0), ("beta1", 1.0),
        ("beta2", -0.1), ("weight_decay", -0.1), ("label_smoothing", 1.0), ("grad_clip", -1), ("muon_momentum", 1.5),
        ("muon_lr", -0.02), ("muon_ns_steps", 0), ("warmdown_frac", 0), ("total_batch_size", -1), ("dropout", 1.0),
        ("n_embd", 0), ("n_layer", -2), ("learning_rate", "nan"), ("compile", "maybe"), ("lr_schedule", "linear")]],
    (T + ["--dataset=noval_char"], "val.bin"), (T + ["--dataset=badjson_char"], "meta.json"),
    (T + ["--dataset=objdtype_char"], "meta.json"), (T + ["--dataset=bigid_char"], "vocab_size=5"),
    (T + ["--dataset=odd_char"], "train.bin"), (T + ["--dataset=nothing_char"], "prepare_char.py"),
    (T[:-2] + ["--out_dir=afile"], "afile"), (T + ["--init_from=out-corrupt/ckpt.pt"], "not a readable checkpoint"),
    (T + ["--init_from=foreign.pt"], "foreign.pt"), (T + ["--init_from=hf:nowhere"], "nowhere"),
    (T + ["--init_from=out-tiny", "--dataset=text_bpe"], "characters but data/text_bpe holds a"),
    *[(S + [f"--{k}={v}"], k) for k, v in [("num_samples", 0), ("max_new_tokens", -1), ("temperature", -0.5),
                                           ("top_p", 0), ("top_p", 1.5), ("top_k", -1), ("device", "tpu")]],
    (["sample.py", "--out_dir=nowhere"], "nowhere"),
    (["sample.py", "--out_dir=out-corrupt"], "not a readable checkpoint"),
    (S + ["--prompt=FILE:missing.txt"], "missing.txt"), (S + ["--ckpt=best.pt"], "best.pt"),
    (S + ["--quantize=int4"], "quantize"), (C + ["--quantize=fp8"], "quantize"),
    *[(C + [f"--{k}={v}"], k) for k, v in [("top_p", 2), ("temperature", -1), ("max_new_tokens", 0), ("top_k", -3)]],
    (["chat.py", "--out_dir=nowhere"], "nowhere"),
    (PC + ["--input=missing.txt"], "missing.txt"), (PC + ["--input=empty.txt"], "empty"),
    (PC + ["--input=binary.bin"], "binary.bin"), (PC + ["--input=latin1.txt"], "latin1.txt"),
    (PC + ["--input=text.txt", "--val_fraction=0"], "val_fraction"),
    (PC + ["--input=text.txt", "--val_fraction=1.5"], "val_fraction"),
    (PC + ["--input=text.txt", "--chunk_size=0"], "chunk_size"), (PC + ["--input=text.txt", "--split=middle"], "split"),
    (PC + ["--input=text.txt", "--out_dir=data/badjson_char"], "meta.json"),
    (PB + ["--input=text.txt", "--vocab_size=100"], "vocab_size"),
    (PB + ["--input=text.txt", "--vocab_size=-5"], "vocab_size"),
    (PB + ["--input=text.txt", "--chunk_bytes=0"], "chunk_bytes"), (PB + ["--input=fake.parquet"], "fake.parquet"),
    (PB + ["--input=text.txt", "--tokenizer=nottok.json"], "nottok.json"), (PB + ["--input=empty.txt"], "empty"),
    (PB + ["--input=text.txt", "--val_fraction=0"], "val_fraction"),
    (PB + ["--input=tokens.parquet", "--tokenizer=data/text_bpe/tokenizer.json", "--out_dir=data/tok_bpe"], "70000"),
    (B + ["--runs=0"], "runs"), (B + ["--variants=[]"], "variants"), (B + ["--mode=fly"], "mode"),
    (B + ["--mode=step", "--steps=0"], "steps"), (["bench_prepare.py", "--mode=corpus", "--corpus_mb=0"], "corpus_mb"),
    (["convert.py", "--out_dir=x"], "nothing to do"), (["convert.py", "--src=nowhere", "--out_dir=x"], "nowhere"),
    (["convert.py", "--out_dir=out-tiny", "--to=onnx", "--dest=y"], "to"),
    (["convert.py", "--src=hf:hf-broken", "--out_dir=x"], "config.json"),
    (["convert.py", "--src=hf:hf-wrongkind", "--out_dir=x"], "bert"),
    (T + ["--init_from=hf:hf-broken"], "config.json"), (["report.py", "nowhere"], "nowhere"),
    (["report.py"], "OUT_DIR"),
    (R + ["--dataset=nothing_char"], "prepare_char.py"), (R + ["--dataset=badjson_char"], "meta.json"),
    (R + ["--priority=fast"], "priority"), (R + ["--max_time=0"], "max_time"), (R + ["--device=tpu"], "device"),
    (R + ["--compare=sometimes"], "compare"), (R + ["--run=True", "--out_dir=out-tiny"], "out-tiny already holds"),
]


@pytest.mark.parametrize("argv,word", CASES, ids=[" ".join(c[0][:1] + c[0][-1:]) for c in CASES])
def test_bad_input_is_one_line_and_changes_no_file(safe, argv, word):
    if "tokens.parquet" in " ".join(argv) and not (safe / "tokens.parquet").exists():
        pytest.skip("pyarrow is not installed")
    before = digests(safe)
    proc = run(argv[0], *argv[1:], cwd=safe, ok=False)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], proc.stderr
    assert "weights_only=False" not in proc.stderr and "\x1b" not in proc.stderr
    after = digests(safe)
    assert {k: v for k, v in after.items() if k in before} == before  # new files may appear; none changed or lost


def test_die_keeps_one_clean_line():
    from errors import die
    with pytest.raises(SystemExit) as e:
        die("bad \x1b[31mred\x1b[0m value\nsecond line\r\x07")
    assert e.value.code == "error: bad red value second line"


def start(cwd, *args):
    """train.py in its own process (signals and locks are per process)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_iter(out_dir, it, proc, timeout=120):
    """Wait until metrics.csv has logged iteration `it`."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        try:
            with open(out_dir / "metrics.csv") as f:
                if any(r["loss"] and int(r["iter"]) >= it for r in csv.DictReader(f)):
                    return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError("the run did not get there")


def rows(out_dir):
    with open(out_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_says_one_line_and_resumes_exactly(workdir, sig, code):
    args = [*BASE, "--eval_interval=1000", "--lr_decay_iters=300", "--dropout=0.1"]
    name = f"out-sig{code}"
    proc = start(workdir, *args, "--max_iters=100000", f"--out_dir={name}")
    wait_for_iter(workdir / name, 20, proc)
    proc.send_signal(sig)
    time.sleep(0.02)
    proc.send_signal(sig)  # impatient: a second one while it saves
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and len(err.strip().splitlines()) == 1, err
    stopped = torch.load(workdir / name / "ckpt.pt", weights_only=True)["iter_num"]
    assert f"stopped at iter {stopped} by {sig.name}; resume with --init_from=resume" in err
    end = stopped + 8
    run("train.py", *args, f"--max_iters={end}", "--init_from=resume", f"--out_dir={name}", cwd=workdir)
    run("train.py", *args, f"--max_iters={end}", f"--out_dir={name}-straight", cwd=workdir)
    a, b = (torch.load(workdir / d / "ckpt.pt", weights_only=True) for d in (name, f"{name}-straight"))
    assert a["iter_num"] == b["iter_num"] == end and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    losses = lambda folder: [(r["iter"], r["loss"]) for r in rows(folder)]
    assert losses(workdir / name) == losses(workdir / f"{name}-straight")


def test_signal_with_save_strategy_none_writes_nothing(workdir):
    proc = start(workdir, *BASE, "--max_iters=100000", "--eval_interval=1000", "--save_strategy=none",
                 "--out_dir=out-sig-none")
    wait_for_iter(workdir / "out-sig-none", 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "nothing saved" in err and not (workdir / "out-sig-none" / "ckpt.pt").exists()


def test_a_signal_during_an_evaluation_stops_without_waiting_for_it(workdir):
    # 10^6 evaluation batches would take many minutes; the run must stop within seconds, saving the step it is at
    proc = start(workdir, *BASE, "--max_iters=100000", "--eval_iters=1000000", "--out_dir=out-sig-eval")
    for line in proc.stdout:  # the start-up lines: the last one comes just before the first evaluation
        if "tokens per step" in line:
            break
    time.sleep(0.5)  # into the evaluation
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and len(err.strip().splitlines()) == 1 and "stopped at iter 0 by SIGTERM" in err, err
    assert torch.load(workdir / "out-sig-eval" / "ckpt.pt", weights_only=True)["iter_num"] == 0
    run("train.py", *BASE, "--max_iters=2", "--eval_iters=2", "--init_from=resume", "--out_dir=out-sig-eval",
        cwd=workdir)
    proc = start(workdir, *BASE, "--eval_only=True", "--eval_iters=1000000", "--init_from=resume",
                 "--out_dir=out-sig-eval")
    before = (workdir / "out-sig-eval" / "ckpt.pt").read_bytes()
    for line in proc.stdout:  # the start-up lines: the last one comes just before the evaluation
        if "tokens per step" in line:
            break
    time.sleep(0.5)  # into the evaluation
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "nothing saved" in err and len(err.strip().splitlines()) == 1, err
    assert (workdir / "out-sig-eval" / "ckpt.pt").read_bytes() == before  # eval_only writes nothing, stopped or not


def test_resuming_on_a_dataset_prepared_again_with_another_vocabulary_is_refused(trained, tmp_path):
    shutil.copytree(trained / "out-tiny", tmp_path / "out-tiny")
    shutil.copytree(trained / "data" / "tiny_char", tmp_path / "data" / "tiny_char")
    meta_path = tmp_path / "data" / "tiny_char" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "vocab": meta["vocab"][1:] + meta["vocab"][:1]}))  # same size, ids moved
    before = digests(tmp_path)
    proc = run("train.py", *BASE, "--init_from=resume", "--out_dir=out-tiny", "--max_iters=70", cwd=tmp_path, ok=False)
    assert proc.stderr.startswith("error: data/tiny_char has a different vocabulary")
    assert len(proc.stderr.splitlines()) == 1
    assert digests(tmp_path) == before


def test_a_second_run_on_the_same_out_dir_is_refused(workdir):
    first = start(workdir, *BASE, "--max_iters=100000", "--eval_interval=20", "--out_dir=out-locked")
    wait_for_iter(workdir / "out-locked", 2, first)
    for extra in ([], ["--init_from=resume"], ["--overwrite=True"]):
        proc = run("train.py", *BASE, "--max_iters=200", "--out_dir=out-locked", *extra, cwd=workdir, ok=False)
        assert f"in use by another train.py (PID {first.pid})" in proc.stderr
    first.send_signal(signal.SIGTERM)  # the first run ends as it would, saving where it got to
    out, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    table = rows(workdir / "out-locked")  # one writer: a clean table, iterations in order
    assert all(None not in r and len(r) == 13 for r in table)  # as many fields as the header, no line cut or merged
    assert [int(r["iter"]) for r in table] == sorted(int(r["iter"]) for r in table)
    stopped = torch.load(workdir / "out-locked" / "ckpt.pt", weights_only=True)["iter_num"]
    # free again
    run("train.py", *BASE, f"--max_iters={stopped + 2}", "--init_from=resume", "--out_dir=out-locked", cwd=workdir)


def test_metrics_stay_ordered_after_kill_9_and_resume(workdir):
    proc = start(workdir, *BASE, "--max_iters=100000", "--eval_interval=10", "--lr_decay_iters=200",
                 "--out_dir=out-killed")
    wait_for_iter(workdir / "out-killed", 25, proc)
    proc.kill()
    proc.communicate()
    saved = torch.load(workdir / "out-killed" / "ckpt.pt", weights_only=True)["iter_num"]
    run("train.py", *BASE, f"--max_iters={saved + 15}", "--eval_interval=10", "--lr_decay_iters=200",
        "--init_from=resume",
        "--out_dir=out-killed", cwd=workdir)
    table = rows(workdir / "out-killed")
    logged = [int(r["iter"]) for r in table if r["loss"]]
    assert logged == list(range(1, saved + 16))  # each step once, in order: the rows after the checkpoint were dropped
    assert [int(r["iter"]) for r in table] == sorted(int(r["iter"]) for r in table)


def test_resume_writes_only_to_the_out_dir_it_was_started_with(workdir, tmp_path):
    run("train.py", *BASE, "--max_iters=4", "--eval_interval=4", "--out_dir=out-orig", cwd=workdir)
    before = digests(workdir / "out-orig")
    shutil.copytree(workdir / "out-orig", workdir / "out-copy")
    # a copied run, resumed in place
    run("train.py", "--init_from=resume", "--max_iters=6", "--out_dir=out-copy", cwd=workdir)
    assert digests(workdir / "out-orig") == before
    assert torch.load(workdir / "out-copy" / "ckpt.pt", weights_only=True)["iter_num"] == 6
    ckpt = torch.load(workdir / "out-copy" / "ckpt.pt", weights_only=True)
    ckpt["config"]["out_dir"] = str(tmp_path / "elsewhere")  # a tampered checkpoint
    torch.save(ckpt, workdir / "out-copy" / "ckpt.pt")
    run("train.py", "--init_from=resume", "--max_iters=8", "--out_dir=out-copy", cwd=workdir)
    assert not (tmp_path / "elsewhere").exists() and digests(workdir / "out-orig") == before


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_log_without_wandb_says_what_to_install(workdir):
    proc = run("train.py", *BASE, "--max_iters=2", "--wandb_log=True", "--out_dir=out-wandb", cwd=workdir, ok=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: wandb_log=True needs wandb: pip install wandb (or run with --wandb_log=False)"]
