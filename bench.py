"""
Benchmark training runs: each variant of train.py's arguments is run `runs` times (round-robin, so
machine noise spreads evenly), and the medians are printed as a Markdown table with ratios against
the first variant, which is the baseline measured in the same session.

    python bench.py --args="config/char_tiny.py --eval_iters=200"
    python bench.py --args="config/shakespeare_char_cpu.py" --variants="['', '--optimizer=adamw']" --runs=3
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
args = "config/char_tiny.py"  # train.py arguments shared by every variant
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


if __name__ == "__main__":
    configure(globals())
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
