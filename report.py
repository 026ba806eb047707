"""
Report on training runs: what each one is (architecture, parameters, tokenizer), how far it got (iterations,
tokens seen, seconds of training), how good it is (best and last val loss, bits per byte), its checkpoint's size,
and a PNG of the loss curves against iterations and against seconds of training, the runs overlaid, so runs of
different speed compare honestly. Reads metrics.csv, run_meta.json and meta.json (a checkpoint file alone is read
with weights_only=True, never built into a model). The plot needs matplotlib (optional: pip install matplotlib).

    python report.py out-char-tiny
    python report.py out-a out-b --out=curves.png
    python report.py out-char-tiny/best.pt
"""

import os
import sys

from checkpoint import load_checkpoint, resolve_checkpoint
from configurator import configure
from dataset import atomic_write, check_writable, read_json
from errors import die
from model import config_from_dict
from runlog import read_metrics

# -----------------------------------------------------------------------------
out = ""  # the PNG to write; '' = curves.png in the first run's folder
plot = True  # False: the text report only
# -----------------------------------------------------------------------------


def read_record(path):
    """A run folder's JSON file, {} when it has none (one line when it is damaged)."""
    return read_json(path, os.path.basename(path), "it is a record only: delete it") if os.path.isfile(path) else {}


def read_run(spec):
    """What report.py knows about a run folder (or a checkpoint file): a dict of its figures and curves."""
    folder, ckpt_file = (spec, None) if os.path.isdir(spec) else (os.path.dirname(spec) or ".", spec)
    if not os.path.isdir(folder) or (ckpt_file and not os.path.isfile(ckpt_file)):
        die(f"{spec} is neither a run folder nor a checkpoint file")
    info, meta = read_record(os.path.join(folder, "run_meta.json")), read_record(os.path.join(folder, "meta.json"))
    config, model_config = info.get("config", {}), info.get("model_config", {})
    saved = {}
    # a checkpoint alone: its stored configs and counters (tensors are not built into a model)
    if ckpt_file or not info:
        saved = load_checkpoint(ckpt_file or resolve_checkpoint(folder))
        config, model_config = saved.get("config", config), saved.get("model_config", model_config)
        meta = saved.get("meta") or meta
    metrics = os.path.join(folder, "metrics.csv")
    rows = read_metrics(metrics) if os.path.isfile(metrics) else []
    # seconds of training at each logged iteration: as train.py counted them (train_s), or for older runs ms/iter
    # times the iterations since the previous log line
    seconds, t, last = {}, 0.0, 0
    for r in rows:
        it = int(r["iter"])
        if r.get("train_s") is not None:
            t, last = r["train_s"], it
        elif r.get("ms_per_iter") is not None:
            t += r["ms_per_iter"] / 1000 * (it - last)
            last = it
        seconds[it] = t
    evals = [(int(r["iter"]), r["val_loss"], r.get("val_bpb") or float("nan")) for r in rows
             if r.get("val_loss") is not None]
    iters = max([int(r["iter"]) for r in rows] + [saved.get("iter_num", 0)])
    tokens_per_step = config.get("total_batch_size") or (config.get("gradient_accumulation_steps", 0) *
                                                         config.get("batch_size", 0) * config.get("block_size", 0))
    paths = {n: os.path.join(folder, n) for n in ("ckpt.pt", "best.pt")}
    ckpts = {n: os.path.getsize(p) for n, p in paths.items() if os.path.isfile(p)}
    return dict(name=spec, folder=folder, config=config, model_config=model_config, meta=meta or {}, rows=rows,
                seconds=seconds, evals=evals, iters=iters, tokens=iters * tokens_per_step, ckpts=ckpts,
                parameters=info.get("parameters"), train_time=saved.get("train_time", t))


def describe(run):
    """The text report of one run, a few lines."""
    try:
        arch = config_from_dict(run["model_config"]).describe() if run["model_config"] else "unknown architecture"
    except (TypeError, ValueError) as e:
        arch = f"an architecture this version cannot build ({e})"
    meta = run["meta"]
    vocab = f"{meta.get('tokenizer', '?')} tokenizer, {meta.get('vocab_size', '?')} tokens"
    params = f"{run['parameters'] / 1e6:.2f}M parameters" if run["parameters"] else "parameters unknown"
    lines = [f"{run['name']}: {run['config'].get('model_type', '')} {arch}", f"  {params} | {vocab} | "
             f"dataset {run['config'].get('dataset', '?')}",
             f"  {run['iters']:,} iterations, {run['tokens']:,} tokens seen, {run['train_time']:.1f} s of training"]
    if run["evals"]:
        best = min(run["evals"], key=lambda e: e[1])
        last = run["evals"][-1]
        lines.append(f"  val loss: best {best[1]:.4f} (iter {best[0]}, {best[2]:.3f} bits per byte), "
                     f"last {last[1]:.4f} (iter {last[0]}, {last[2]:.3f} bpb)")
    else:
        lines.append("  no evaluation logged yet")
    if run["ckpts"]:
        lines.append("  " + ", ".join(f"{n} {size / 1e6:.1f} MB" for n, size in run["ckpts"].items()))
    return "\n".join(lines)


def draw(runs, path):
    """Train and val loss against iterations (left) and against seconds of training (right), runs overlaid."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no plot: it needs matplotlib (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    # runs on different tokenizers compare in bits per byte, not loss per token: each run's train loss scaled by its
    # last evaluation's bits per byte over its loss (its bytes per token)
    bpb = len({(run["meta"].get("tokenizer"), run["meta"].get("vocab_size")) for run in runs}) > 1
    for i, run in enumerate(runs):
        color = f"C{i}"
        scale = run["evals"][-1][2] / run["evals"][-1][1] if bpb and run["evals"] else 1.0
        train = [(int(r["iter"]), r["loss"] * scale) for r in run["rows"] if r.get("loss") is not None]
        for ax, x_of in ((axes[0], lambda it: it), (axes[1], lambda it, run=run: run["seconds"].get(it, 0.0))):
            if train:
                ax.plot([x_of(it) for it, _ in train], [v for _, v in train], color=color, alpha=0.35, lw=1,
                        label=f"{run['name']} train")
            if run["evals"]:
                ax.plot([x_of(e[0]) for e in run["evals"]], [e[2 if bpb else 1] for e in run["evals"]], color=color,
                        marker="o",
                        ms=3, lw=1.5, label=f"{run['name']} val")
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("seconds of training")
    axes[0].set_ylabel("bits per byte (the runs' tokenizers differ)" if bpb else "loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    specs = [a for a in sys.argv[1:] if not a.startswith("-") and not a.endswith(".py")]
    configure(globals(), [a for a in sys.argv[1:] if a not in specs])
    if not specs:
        die("name the runs to report on: python report.py OUT_DIR [OUT_DIR ...] (or a checkpoint file)")
    if plot:  # every check before anything is written
        first = specs[0] if os.path.isdir(specs[0]) else os.path.dirname(specs[0]) or "."
        png = out or os.path.join(first, "curves.png")
        check_writable(os.path.dirname(png) or ".", "--out's folder")
        if not os.path.isdir(os.path.dirname(os.path.abspath(png))):
            die(f"--out={png}: the folder {os.path.dirname(png)} does not exist; create it or pick another --out")
    runs = [read_run(s) for s in specs]
    print("\n".join(describe(r) for r in runs))
    if plot:
        draw(runs, png)
