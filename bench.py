"""
Benchmarks, as medians of several runs with ratios against a baseline measured in the same session.

mode=train: each variant of train.py's arguments is run `runs` times (round-robin, so machine noise
spreads evenly); the table has val loss, bits per byte, training and wall time, ms/iter and tok/s.
mode=prepare: prepare_bpe.py's throughput (MB/s) and peak memory on a corpus, against the tokenizer's
own encode_batch on the same text in memory (the ceiling).

    python bench.py --args="config/char_tiny.py --eval_iters=200"
    python bench.py --args="config/shakespeare_char_cpu.py" --variants="['', '--optimizer=adamw']" --runs=3
    python bench.py --mode=prepare --args="--input=corpus/ --tokenizer=data/pydocs_bpe/tokenizer.json"
"""

import csv
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from configurator import configure, die

# -----------------------------------------------------------------------------
mode = "train"  # train | prepare
args = "config/char_tiny.py"  # train.py (or prepare_bpe.py) arguments shared by every variant
variants = [""]  # extra train.py arguments per variant; the first is the baseline
runs = 3  # runs per variant; the table shows medians
# -----------------------------------------------------------------------------


def one_run(extra):
    """Run train.py once in a scratch out_dir; return its figures."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "train.py", *shlex.split(args), *shlex.split(extra), f"--out_dir={out}", "--overwrite=True"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode:
            die(f"train.py {args} {extra} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
        with open(os.path.join(out, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
    done = re.search(r"iterations, best val loss [\d.]+, ([\d.]+) s of training", proc.stdout)
    steps = [r for r in rows if r["ms_per_iter"]]
    return dict(val_loss=float([r for r in rows if r["val_loss"]][-1]["val_loss"]),
                val_bpb=float([r for r in rows if r["val_bpb"]][-1]["val_bpb"]),
                train_s=float(done.group(1)) if done else float("nan"), wall_s=wall,
                ms_per_iter=statistics.median(float(r["ms_per_iter"]) for r in steps) if steps else float("nan"),
                tok_per_s=statistics.median(float(r["tok_per_s"]) for r in steps) if steps else float("nan"))


def run_measured(cmd):
    """Run cmd; return (wall seconds, peak RSS in MB of that process) or stop on failure."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        die(f"{' '.join(cmd)} failed: {err.strip().splitlines()[-1] if err.strip() else status}")
    return time.time() - t0, usage.ru_maxrss / 1024


def bench_prepare():
    """prepare_bpe.py end to end vs the raw tokenizer's encode_batch over the same documents in memory."""
    from tokenizers import Tokenizer
    opts = dict(a[2:].split("=", 1) for a in shlex.split(args) if a.startswith("--") and "=" in a)
    files = sorted(os.path.join(opts["input"], f) for f in os.listdir(opts["input"]) if f.endswith(".txt"))
    nbytes = sum(os.path.getsize(f) for f in files)
    tok = Tokenizer.from_file(opts["tokenizer"])
    prep, raw, rss = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as out:
            wall, peak = run_measured([sys.executable, "prepare_bpe.py", *shlex.split(args), f"--out_dir={out}"])
        prep.append(nbytes / 1e6 / wall)
        rss.append(peak)
        texts = [open(f, encoding="utf-8").read() for f in files]
        t0, batch, size = time.time(), [], 0
        for t in texts + [None]:
            if t is None or size >= 4_000_000:
                tok.encode_batch(batch, add_special_tokens=False)
                batch, size = [], 0
            if t is not None:
                batch.append(t)
                size += len(t)
        raw.append(nbytes / 1e6 / (time.time() - t0))
        del texts
        print(f"prepare {prep[-1]:.2f} MB/s, peak RSS {peak:.0f} MB; raw encode_batch {raw[-1]:.2f} MB/s", file=sys.stderr)
    p, r = statistics.median(prep), statistics.median(raw)
    print(f"prepare_bpe.py {args} — {nbytes / 1e6:.0f} MB, medians of {runs} runs")
    print("| corpus | prepare_bpe MB/s | raw encode_batch MB/s | ratio | peak RSS MB |")
    print("|---|---|---|---|---|")
    print(f"| {nbytes / 1e6:.0f} MB | {p:.2f} | {r:.2f} | {p / r:.0%} | {statistics.median(rss):.0f} |")


if __name__ == "__main__":
    configure(globals())
    if mode == "prepare":
        bench_prepare()
        raise SystemExit
    results = {v: [] for v in variants}
    for i in range(runs):
        for v in variants:
            results[v].append(one_run(v))
            r = results[v][-1]
            print(f"run {i + 1}/{runs} [{v or 'baseline'}]: val loss {r['val_loss']:.4f}, {r['train_s']:.1f} s training, "
                  f"{r['wall_s']:.1f} s wall, {r['ms_per_iter']:.1f} ms/iter", file=sys.stderr, flush=True)
    keys = ["val_loss", "val_bpb", "train_s", "wall_s", "ms_per_iter", "tok_per_s"]
    med = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in results.items()}
    base = med[variants[0]]
    print(f"train.py {args} — medians of {runs} runs")
    print("| variant | val loss | val bpb | train s | wall s | ms/iter | tok/s | ms/iter vs baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for v, m in med.items():
        print(f"| {v or 'baseline'} | {m['val_loss']:.4f} | {m['val_bpb']:.4f} | {m['train_s']:.1f} | {m['wall_s']:.1f} | "
              f"{m['ms_per_iter']:.1f} | {m['tok_per_s']:,.0f} | {m['ms_per_iter'] / base['ms_per_iter']:.2f}x |")
