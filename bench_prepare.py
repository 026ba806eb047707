"""
prepare_bpe.py's throughput (MB/s) and peak memory on a corpus, as medians of several runs, against the tokenizer's
own encode_batch_fast on the same text in memory (the ceiling); and a corpus to measure it on (mode=corpus: the UTF-8
.py files of this Python installation, stdlib and site-packages, repeated to about corpus_mb MB of *.txt documents).

    python bench_prepare.py --mode=corpus --corpus_mb=100 --args=corpus/
    python bench_prepare.py --args="--input=corpus/ --tokenizer=data/pydocs_bpe/tokenizer.json"
"""

import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from tokenizers import Tokenizer

from configurator import ABOVE_ZERO, POSITIVE, check, configure
from dataset import check_writable, make_out_dir
from errors import die

# -----------------------------------------------------------------------------
mode = "prepare"  # prepare (time prepare_bpe.py) | corpus (write a corpus folder to time it on)
args = ""  # prepare: prepare_bpe.py's arguments (--input=FOLDER --tokenizer=...); corpus: the folder to write
corpus_mb = 100  # corpus mode: size of the corpus to write
runs = 3  # prepare mode: runs of each; the table shows medians
# -----------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))


def options(text):
    """--key=value pairs of an argument string, as a dict of strings."""
    return dict(a[2:].partition("=")[::2] for a in shlex.split(text) if a.startswith("--"))


def run_measured(cmd):
    """Run cmd; return (wall seconds, peak RSS in MB of that process) or stop on failure."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        die(f"{' '.join(cmd)} failed: {err.strip().splitlines()[-1] if err.strip() else status}")
    return time.time() - t0, usage.ru_maxrss / 1024


def make_corpus(out, mb):
    """A folder of ~mb MB of UTF-8 text documents: this Python's own .py files, in order, repeated to size."""
    import sysconfig
    roots = sorted({sysconfig.get_paths()[k] for k in ("stdlib", "purelib")})
    sources = []
    paths = {os.path.join(d, f) for root in roots for d, _, fs in os.walk(root) for f in fs if f.endswith(".py")}
    for path in sorted(paths):
        with open(path, "rb") as f:
            data = f.read()
        try:
            if data.strip() and b"\x00" not in data and data.decode("utf-8"):
                sources.append(data)
        except UnicodeDecodeError:
            continue
    make_out_dir(out, "--args")
    n = size = 0
    while size < mb * 1e6:
        data = sources[n % len(sources)]
        with open(os.path.join(out, f"{n:07d}.txt"), "wb") as f:
            f.write(data)
        n, size = n + 1, size + len(data)
    print(f"wrote {n:,} documents, {size / 1e6:.1f} MB to {out}")


def bench_prepare():
    """prepare_bpe.py end to end vs the raw tokenizer's encode_batch_fast over the same documents in memory."""
    opts = options(args)
    files = sorted(os.path.join(opts["input"], f) for f in os.listdir(opts["input"]) if f.endswith(".txt"))
    nbytes = sum(os.path.getsize(f) for f in files)
    tok = Tokenizer.from_file(opts["tokenizer"])
    prep, raw, rss = [], [], []
    for _ in range(runs):  # all prepare runs first: a child's peak RSS counts this process's peak at spawn time
        with tempfile.TemporaryDirectory() as out:
            wall, peak = run_measured([sys.executable, os.path.join(HERE, "prepare_bpe.py"), *shlex.split(args),
                                       f"--out_dir={out}"])
        prep.append(nbytes / 1e6 / wall)
        rss.append(peak)
        print(f"prepare {prep[-1]:.2f} MB/s, peak RSS {peak:.0f} MB", file=sys.stderr)
    texts = [open(f, encoding="utf-8").read() for f in files]
    for _ in range(runs):
        t0, batch, size = time.time(), [], 0
        for t in texts + [None]:
            if t is None or size >= 4_000_000:
                tok.encode_batch_fast(batch, add_special_tokens=False)
                batch, size = [], 0
            if t is not None:
                batch.append(t)
                size += len(t)
        raw.append(nbytes / 1e6 / (time.time() - t0))
        print(f"raw encode_batch_fast {raw[-1]:.2f} MB/s", file=sys.stderr)
    p, r = statistics.median(prep), statistics.median(raw)
    print(f"prepare_bpe.py {args} — {nbytes / 1e6:.0f} MB, medians of {runs} runs")
    print("| corpus | prepare_bpe MB/s | raw encode_batch_fast MB/s | ratio | peak RSS MB (max) |")
    print("|---|---|---|---|---|")
    print(f"| {nbytes / 1e6:.0f} MB | {p:.2f} | {r:.2f} | {p / r:.0%} | "
          f"{statistics.median(rss):.0f} ({max(rss):.0f}) |")


if __name__ == "__main__":
    configure(globals())
    if mode not in ("prepare", "corpus"):
        die(f"--mode={mode!r} is not one of prepare, corpus")
    check(globals(), dict(runs=POSITIVE, corpus_mb=ABOVE_ZERO))
    if mode == "corpus":
        check_writable(args, "--args (the corpus folder)")
        if os.path.isdir(args) and os.listdir(args):
            die(f"--args={args} already holds files; corpus mode writes a new folder: pick an empty or new one")
        make_corpus(args, corpus_mb)
    else:
        if not os.path.isdir(options(args).get("input", "")) or not options(args).get("tokenizer"):
            die("--args must give prepare_bpe.py's --input=FOLDER (of *.txt) and --tokenizer=FILE")
        bench_prepare()
