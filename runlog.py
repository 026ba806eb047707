"""
A training run's bookkeeping, kept out of train.py's loop: the out_dir lock, run_meta.json, metrics.csv (written
and read back), Weights & Biases, log lines, and the stop signals.
Not run by itself.
"""

import csv
import os
import signal
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

try:
    import fcntl  # POSIX advisory locks; Windows runs without the out_dir lock
except ImportError:
    fcntl = None

from dataset import atomic_write, read_json, write_json, write_vocab
from errors import die


class RunLog:
    """Everything a run writes besides its tensors, done by rank 0 alone: on other ranks, and with eval_only (which
    writes nothing), every method is a no-op, so the loop calls them without `if master`."""

    def __init__(self, out_dir, master, writes, ddp):
        self.out_dir, self.master, self.writes, self.ddp = out_dir, master, writes, ddp
        self.lock = self.metrics_file = self.wandb = None

    def take_lock(self):
        """Hold out_dir's lock until the process ends (only look, with eval_only); every rank stops if it is taken."""
        busy = None
        if self.master:
            self.lock, busy = lock_out_dir(self.out_dir, probe=not self.writes)
        if self.ddp:
            busy = [busy]
            dist.broadcast_object_list(busy)
            busy = busy[0]
        if busy:
            die(busy)

    def start(self, iter_num, meta, info, fields, wandb_settings=None):
        """Write meta.json (the tokenizer) and run_meta.json, open metrics.csv (cut back to iter_num on a resume)
        and, when asked, start wandb (wandb_settings: project, name, config)."""
        if not self.writes:
            return
        write_vocab(self.out_dir, meta)
        write_run_meta(os.path.join(self.out_dir, "run_meta.json"), iter_num, info)
        try:
            self.metrics_file, self.metrics = open_metrics(os.path.join(self.out_dir, "metrics.csv"), fields, iter_num)
        except OSError as e:
            die(f"could not write to {self.out_dir} ({e.strerror}); free some space or pick another --out_dir")
        if wandb_settings:
            self.wandb = start_wandb(*wandb_settings)

    def print(self, text, file=None):
        if self.master:
            tqdm.write(text, file=file)

    def record(self, **row):
        """One row of metrics.csv (and of wandb when on)."""
        if not self.writes:
            return
        try:
            cells = {k: f"{v:.8g}" if isinstance(v, float) else v for k, v in row.items() if v is not None}
            self.metrics.writerow(cells)
            self.metrics_file.flush()
        except OSError as e:
            die(f"could not write {self.metrics_file.name} ({e.strerror}); free some space, then resume from the "
                f"last checkpoint")
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if v is not None}, step=row["iter"])

    def close(self):
        for f in (self.metrics_file, self.lock):
            if f is not None:
                f.close()


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM for a training run. Until `training` is set they stop the script at once (nothing
    is lost); after it, they are only noted in `received`, so the loop can finish its step, save and exit."""

    def __init__(self):
        self.training, self.received = False, 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if not self.training:
            print(f"{signal.Signals(signum).name} before training started: stopped, nothing saved", file=sys.stderr)
            raise SystemExit(128 + signum)
        self.received = signum  # a second signal while saving changes nothing: the save finishes

    def agreed(self, device):
        """The signal (number) any rank has received, 0 if none: the same on every rank."""
        if not dist.is_initialized():
            return self.received
        flag = torch.tensor(self.received, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)


def lock_out_dir(out_dir, probe=False):
    """Make out_dir and hold an exclusive lock on out_dir/.lock for the whole run (the OS drops it when the
    process ends, however it ends). Returns (the open lock file, None) or (None, the line saying why not).
    probe=True only looks, creating nothing: (None, that line) if another run holds out_dir, else (None, None)."""
    path = os.path.join(out_dir, ".lock")
    if probe and not os.path.isfile(path):
        return None, None
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:
        return None, f"--out_dir={out_dir} cannot be used ({e.strerror}); pick another --out_dir"
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            return None, (f"{out_dir} is in use by another train.py (PID {pid}); wait for it to finish, stop it, "
                          f"or pick another --out_dir")
    if probe:
        f.close()
        return None, None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f, None


def write_run_meta(path, iter_num, info):
    """run_meta.json: what a run was started with; a resume (iter_num > 0) keeps that and adds itself to `resumed`."""
    if iter_num and os.path.isfile(path):
        first = read_json(path, "run_meta.json", "delete it (it is a record only)")
        resumed = dict(iter=iter_num, **{k: info[k] for k in ("argv", "device", "world_size")})
        first.setdefault("resumed", []).append(resumed)
        info = first
    write_json(path, info)


def open_metrics(path, fields, upto):
    """metrics.csv, open for appending: new with its header, or cut back to the rows up to iteration `upto` (the
    resumed checkpoint's: rows a crash left after it would be written again)."""
    rows = []
    if upto and os.path.isfile(path):
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if (r.get("iter") or "").isdigit() and int(r["iter"]) <= upto]

    def write(f):
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write(path, write)
    f = open(path, "a", newline="", encoding="utf-8")
    return f, csv.DictWriter(f, fieldnames=fields)


def start_wandb(project, name, config):
    """wandb.init, or one line saying how to install it; returns the wandb module for wandb.log."""
    try:
        import wandb
    except ImportError:
        die("wandb_log=True needs wandb: pip install wandb (or run with --wandb_log=False)")
    wandb.init(project=project, name=name, config=config)
    return wandb


def read_metrics(path):
    """metrics.csv's rows, their cells as numbers (None where empty); one line for a cell that is not a number."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            try:
                rows.append({k: float(v) if v else None for k, v in row.items() if k})
            except (TypeError, ValueError):
                bad = next((k, v) for k, v in row.items() if v and not is_number(v))
                die(f"{path} line {n}: {bad[0]}={bad[1]!r} is not a number; the file is damaged (train.py writes "
                    f"numbers only): fix or delete that line")
    return [r for r in rows if r.get("iter") is not None]


def is_number(text):
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False
